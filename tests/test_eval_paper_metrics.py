"""Metrics comparable with papers: SSIM equal to torchmetrics, FID / KID / FVD (the Fréchet distance against
literal numpy / scipy computations, torchmetrics' FID and KID with small deterministic feature networks),
VBench's subject consistency, LPIPS and the set distances wired into reports and `attnpack eval`, and one
rule for identical outputs (PSNR capped at 100 dB)."""

import io
import json

import numpy as np
import pytest
import torch

from attnpack import eval as ev
from attnpack.cli import main
from attnpack.eval import metrics


def texture(height=48, width=64, seed=0):
    import cv2

    noise = np.random.default_rng(seed).integers(0, 255, (height, width, 3)).astype(np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)


def jpeg(image, quality):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def brighter(image, amount):
    return np.clip(image.astype(int) + amount, 0, 255).astype(np.uint8)


class PooledColour(torch.nn.Module):
    """A small deterministic stand-in for Inception: uint8 (N, 3, H, W) -> the mean colour of 2 x 2 cells."""

    num_features = 12

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


class VideoStats(torch.nn.Module):
    """A stand-in for I3D: (N, 3, T, 224, 224) in [-1, 1] -> mean colour and mean frame-to-frame change."""

    def forward(self, videos):
        change = videos.diff(dim=2).abs().mean(dim=(2, 3, 4))
        return torch.cat([videos.mean(dim=(2, 3, 4)), change], dim=1)


class MeanAbsolute(torch.nn.Module):
    """A stand-in for the LPIPS network: two (N, 3, H, W) batches in [-1, 1] -> N distances."""

    def forward(self, a, b):
        return (a - b).abs().mean(dim=(1, 2, 3))


# ---- SSIM


def test_ssim_equals_torchmetrics_on_rgb_and_luma():
    from torchmetrics.functional.image import structural_similarity_index_measure as reference

    def tensor(frames):
        return torch.from_numpy(np.array(frames, np.float64)).permute(0, 3, 1, 2)

    image = texture(96, 128)
    for quality in (30, 75):
        degraded = jpeg(image, quality)
        expected = float(reference(tensor(degraded[None]), tensor(image[None]), data_range=255.0))
        assert ev.ssim(degraded, image) == pytest.approx(expected, abs=1e-9)
    degraded = jpeg(image, 30)
    assert ev.ssim(degraded, image) < ev.ssim_luma(degraded, image) - 0.1  # JPEG's errors are in colour
    luma = [torch.from_numpy(metrics._gray(x))[None, None] for x in (degraded, image)]
    assert ev.ssim_luma(degraded, image) == pytest.approx(float(reference(*luma, data_range=255.0)), abs=1e-9)
    video = np.stack([texture(seed=s) for s in range(3)])
    noisy = np.stack([jpeg(frame, 40) for frame in video])  # a video: the mean over frames, as torchmetrics
    assert ev.ssim(noisy, video) == pytest.approx(
        float(reference(tensor(noisy), tensor(video), data_range=255.0))
    )


# ---- the Fréchet distance


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances: ||mu1 - mu2||² + Σ (√a - √b)²
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)  # 5 + 5
    # Full covariances: a literal computation, sqrt(S1 S2) as S1^½ (S1^½ S2 S1^½)^½ S1^-½ from eigh
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)

    def root(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T

    r1 = root(s1)
    literal = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root(r1 @ s2 @ r1))
    assert ev.frechet_distance(m1, s1, m2, s2) == pytest.approx(literal, rel=1e-9)
    assert ev.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)
    scipy_linalg = pytest.importorskip("scipy.linalg")  # not a dependency: checked where it is installed
    with_scipy = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert ev.frechet_distance(m1, s1, m2, s2) == pytest.approx(with_scipy, rel=1e-9)


def test_gaussian_statistics_need_two_samples():
    mean, cov = ev.gaussian_statistics([[0.0, 1.0], [2.0, 3.0]])
    assert mean.tolist() == [1.0, 2.0] and cov.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    with pytest.raises(ValueError, match="N >= 2"):
        ev.gaussian_statistics([[0.0, 1.0]])


# ---- FID and KID (torchmetrics, a stand-in feature network)


def test_fid_identical_sets_zero_shifted_sets_more():
    images = [texture(seed=s) for s in range(8)]
    feature = PooledColour()
    assert ev.fid(images, images, feature) == pytest.approx(0, abs=1e-6)
    near = ev.fid([brighter(i, 10) for i in images], images, feature)
    far = ev.fid([brighter(i, 40) for i in images], images, feature)
    assert 0 < near < far
    # torchmetrics' FID is the Fréchet distance of the Gaussians of the same features
    with torch.no_grad():
        ours, theirs = (feature(torch.from_numpy(np.stack(s)).permute(0, 3, 1, 2)).numpy()
                        for s in ([brighter(i, 40) for i in images], images))  # fmt: skip
    expected = ev.frechet_distance(*ev.gaussian_statistics(ours), *ev.gaussian_statistics(theirs))
    assert far == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 images"):
        ev.fid(images[:1], images[:1], feature)


def test_kid_equals_a_literal_mmd():
    images = [texture(seed=s) for s in range(8)]
    shifted = [brighter(i, 30) for i in images]
    feature = PooledColour()
    # every sample in one subset: the unbiased MMD² with k(x, y) = (x·y / d + 1)³, no randomness left
    result = ev.kid(shifted, images, feature, subsets=3, subset_size=8)
    with torch.no_grad():
        x, y = (
            feature(torch.from_numpy(np.stack(s)).permute(0, 3, 1, 2)).double().numpy()
            for s in (shifted, images)
        )
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    n = len(x)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    literal = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    assert result["mean"] == pytest.approx(literal, rel=1e-4) and result["std"] == pytest.approx(0, abs=1e-6)
    same = ev.kid(images, images, feature, subsets=3, subset_size=8)  # unbiased: just below 0 for one set
    assert -0.01 * result["mean"] < same["mean"] <= 0 < result["mean"], (same, result)
    with pytest.raises(ValueError, match="subset_size 9"):
        ev.kid(images, images, feature, subset_size=9)


# ---- FVD (a stand-in video feature network)


def test_fvd_identical_sets_zero_shifted_sets_more():
    big = texture(48, 120)
    videos = [np.stack([big[:, 8 + step * i : 72 + step * i] for i in range(6)]) for step in (0, 1, 2, 3)]
    feature = VideoStats()
    assert ev.fvd(videos, videos, feature) == pytest.approx(0, abs=1e-9)
    near = ev.fvd([brighter(v, 10) for v in videos], videos, feature)
    far = ev.fvd([brighter(v, 40) for v in videos], videos, feature)
    assert 0 < near < far
    features = ev.video_features(videos, feature)
    assert features.shape == (4, 6)
    clip = metrics._i3d_input(videos[0])  # I3D's input: short side 224, centre crop, [-1, 1]
    assert clip.shape == (1, 3, 6, 224, 224) and clip.min() >= -1 and clip.max() <= 1
    with pytest.raises(ValueError, match="at least 2 videos"):
        ev.fvd(videos[:1], videos, feature)
    with pytest.raises(ValueError, match="single image"):
        ev.fvd([videos[0][0], videos[1][0]], videos[:2], feature)


def test_missing_feature_networks_say_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    images = [texture(seed=s) for s in range(2)]
    with pytest.raises(ev.MetricModelUnavailable, match=r"Inception v3 \(pt_inception.*torch-fidelity"):
        ev.fid(images, images)
    with pytest.raises(ev.MetricModelUnavailable, match=r"KID's Inception v3"):
        ev.kid(images, images)
    videos = [np.stack(images)] * 2
    with pytest.raises(ev.MetricModelUnavailable, match=r"i3d_torchscript\.pt.*offline.*dropbox"):
        ev.fvd(videos, videos)
    with pytest.raises(ev.MetricModelUnavailable, match="does not exist"):
        ev.fvd(videos, videos, str(tmp_path / "no-such-i3d.pt"))


# ---- VBench's subject consistency


def test_subject_consistency_is_vbench_definition(monkeypatch):
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]), dim=-1)
    monkeypatch.setattr(metrics, "image_embeddings", lambda images, model_id, kind: e)
    # frame 1: to previous 0.6, to first 0.6; frame 2: to previous -0.6 -> 0, to first -1 -> 0
    assert ev.subject_consistency(np.zeros((3, 4, 4, 3), np.uint8)) == pytest.approx((0.6 + 0) / 2)
    assert ev.VBENCH_DINO_MODEL == "facebook/dino-vitb16"


# ---- LPIPS, set distances and the identical-output rule in reports and the CLI


def write_manifest(root, pairs):
    """pairs: (method, output frames, dense frames) -> PNG files and manifest.json."""
    from PIL import Image

    entries = []
    for i, (method, output, dense) in enumerate(pairs):
        Image.fromarray(output).save(root / f"{i}-out.png")
        Image.fromarray(dense).save(root / f"{i}-dense.png")
        entries.append({"output": f"{i}-out.png", "dense": f"{i}-dense.png", "method": method, "seed": i})
    (root / "manifest.json").write_text(json.dumps(entries))


def test_report_lpips_sets_and_identical_outputs(tmp_path):
    images = [texture(seed=s) for s in range(4)]
    write_manifest(
        tmp_path, [("same", i, i) for i in images] + [("shifted", brighter(i, 20), i) for i in images]
    )
    rows = ev.evaluate_manifest(tmp_path, lpips_net=MeanAbsolute(), sets=("fid", "kid"),
                                image_features=PooledColour())  # fmt: skip
    outputs = [r for r in rows if "thumbnail" in r]
    assert len(outputs) == 8 and all("lpips" in r["metrics"] for r in outputs)
    same = outputs[0]["metrics"]
    assert same["psnr"] == ev.PSNR_CAP == 100 and same["ssim"] == pytest.approx(1) and same["lpips"] == 0
    sets = {r["method"]: r["metrics"] for r in rows if "thumbnail" not in r}
    assert sets["same"]["fid"] == pytest.approx(0, abs=1e-6) and sets["shifted"]["fid"] > 0.01
    assert sets["shifted"]["kid"]["mean"] > abs(sets["same"]["kid"]["mean"])
    written = ev.write_report(rows, tmp_path / "report")
    summary = json.loads(written[0].read_text())["summary"]
    # one rule for identical outputs: PSNR at its 100 dB cap and SSIM 1 both count in the means
    assert summary["same"]["psnr"] == 100 and summary["same"]["ssim"] == pytest.approx(1)
    assert summary["shifted"]["lpips"] > 0 and summary["shifted"]["fid"] == sets["shifted"]["fid"]
    assert "Distances to the dense outputs" in written[1].read_text()
    with pytest.raises(ValueError, match="not among"):
        ev.evaluate_manifest(tmp_path, sets=("is",))


def test_sets_need_dense_outputs():
    images = [texture(seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="every entry needs 'dense'"):
        ev.score_sets({"clear": images}, {}, ("fid",), image_features=PooledColour())
    with pytest.raises(ValueError, match="FVD scores videos"):
        ev.score_sets({"clear": images}, {"clear": images}, ("fvd",), video_features=VideoStats())


def test_cli_lpips_fid_kid_fvd(tmp_path, monkeypatch, capsys):
    images = [texture(seed=s) for s in range(3)]
    write_manifest(tmp_path, [("clear", brighter(i, 10), i) for i in images])
    fid, kid = metrics.fid, metrics.kid
    monkeypatch.setattr(metrics, "_lpips_network", lambda net: MeanAbsolute())
    monkeypatch.setattr(metrics, "fid", lambda a, b, feature=None: fid(a, b, PooledColour()))
    monkeypatch.setattr(metrics, "kid", lambda a, b, feature=None: kid(a, b, PooledColour()))
    assert main(["eval", str(tmp_path), "--lpips", "--fid", "--kid", "--out", str(tmp_path / "report")]) == 0
    assert "scored 3 outputs" in capsys.readouterr().out
    summary = json.loads((tmp_path / "report" / "report.json").read_text())["summary"]["clear"]
    assert summary["lpips"] > 0 and summary["fid"] > 0 and "kid.mean" in summary
    # FVD of images, and a missing I3D file, stop with what is needed
    assert main(["eval", str(tmp_path), "--fvd", "--out", str(tmp_path / "x")]) == 2
    assert "FVD scores videos" in capsys.readouterr().err


def test_cli_fid_without_inception_says_what_is_needed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    images = [texture(seed=s) for s in range(2)]
    write_manifest(tmp_path, [("clear", i, i) for i in images])
    assert main(["eval", str(tmp_path), "--fid", "--out", str(tmp_path / "report")]) == 2
    assert "Inception v3" in capsys.readouterr().err
