"""`attnpack bench`: timings at named real-model geometries, written as JSON (device, versions, shapes) with
a PNG plot under benchmarks/results/. Baseline and candidate always run in the same process."""
