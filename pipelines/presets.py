"""Presets: named real models with their recommended settings from the papers; the two trained toy models
(`toy-image`, FLUX family; `toy-video`, Wan family), which work offline and make something meaningful; and a
tiny random-weight preset for each other family (smoke models, labelled as such everywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods.radial import PRESETS as RADIAL_PAPER  # the paper's settings per model
from ..training.toy_models import TOY_GEOMETRY, TOY_METHODS
from .tiny import RANDOM_WEIGHTS_NOTE, TINY_PIPELINES, build_tiny_pipeline, tiny_call_kwargs


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # attnpack family: unet, flux, wan, cogvideox, hunyuan_video
    kind: str  # "image" or "video"
    model: str  # Hub id; "tiny" for a random-weight smoke model; "assets/toy-<kind>" for a trained toy
    description: str
    call: dict[str, Any] = field(default_factory=dict)  # size, frames, steps, guidance
    dtype: str = "bfloat16"
    offload: str = ""  # advice for smaller GPUs
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> recommended settings
    extra: dict[str, str] = field(default_factory=dict)  # other components by id (motion adapter, VAE)

    @property
    def is_tiny(self) -> bool:
        """A random-weight smoke model: what it makes is noise."""
        return self.model == "tiny"

    @property
    def is_toy(self) -> bool:
        """A trained toy model, shipped in assets/: offline, and its outputs mean something."""
        return self.name in TOY_PRESETS

    @property
    def offline(self) -> bool:
        """Loads without the network (`attnpack presets --json` says so per preset)."""
        return self.is_tiny or self.is_toy

    def settings(self, method: str) -> dict[str, Any]:
        return dict(self.methods.get(method, {}))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "family": self.family, "kind": self.kind, "model": self.model,
            "description": self.description, "call": self.call, "dtype": self.dtype, "offload": self.offload,
            "methods": self.methods, "offline": self.offline,
            **({"note": RANDOM_WEIGHTS_NOTE} if self.is_tiny else {}),
            **({"note": TOY_NOTE} if self.is_toy else {}),
        }  # fmt: skip


WAN_METHODS = {
    "radial": dict(RADIAL_PAPER["wan2.1"]),
    "freenoise": {"context_length": 21, "context_stride": 5},
    "freelong": {"local_window": 21},
    "trajectory": {"rope_steps": 5, "mask_steps": 30},
    "pooled_agent": {"agent_grid": 16},
    "dense": {},
}
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("wan2.1-t2v-1.3b", "wan", "video", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan 2.1 text-to-video 1.3B",
               {"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50, "guidance_scale": 5.0},
               offload="about 8 GB with pipe.enable_model_cpu_offload()", methods=WAN_METHODS),
        Preset("wan2.1-t2v-14b", "wan", "video", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan 2.1 text-to-video 14B",
               {"height": 720, "width": 1280, "num_frames": 81, "num_inference_steps": 50, "guidance_scale": 5.0},
               offload="needs an 80 GB GPU, or model CPU offload on 48 GB", methods=WAN_METHODS),
        Preset("wan2.2", "wan", "video", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan 2.2 text-to-video A14B (two experts)",
               {"height": 720, "width": 1280, "num_frames": 81, "num_inference_steps": 40, "guidance_scale": 4.0,
                "guidance_scale_2": 3.0},
               offload="two 14B experts: model CPU offload below 80 GB",
               methods={**WAN_METHODS, "radial": dict(RADIAL_PAPER["wan2.2"])}),
        Preset("hunyuanvideo", "hunyuan_video", "video", "hunyuanvideo-community/HunyuanVideo", "HunyuanVideo 13B",
               {"height": 720, "width": 1280, "num_frames": 129, "num_inference_steps": 50, "guidance_scale": 6.0},
               offload="model CPU offload and VAE tiling below 80 GB",
               methods={"radial": dict(RADIAL_PAPER["hunyuanvideo"]), "trajectory": {}, "dense": {}}),
        Preset("cogvideox-5b", "cogvideox", "video", "THUDM/CogVideoX-5b", "CogVideoX 5B",
               {"height": 480, "width": 720, "num_frames": 49, "num_inference_steps": 50, "guidance_scale": 6.0},
               offload="model CPU offload and VAE tiling below 24 GB",
               methods={"radial": {"decay_factor": 1.0, "sink": True}, "trajectory": {}, "dense": {}}),
        Preset("flux.1-dev", "flux", "image", "black-forest-labs/FLUX.1-dev", "FLUX.1 [dev]",
               {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5},
               offload="model CPU offload below 32 GB",
               methods={"clear": {"radius": 16, "down_factor": 4, "weights": "Huage001/CLEAR"},
                        "isolation": {}, "pooled_agent": {"agent_grid": 16}, "dense": {}}),
        Preset("sdxl", "unet", "image", "stabilityai/stable-diffusion-xl-base-1.0", "Stable Diffusion XL base",
               {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 5.0}, dtype="float16",
               offload="fits 12 GB; model CPU offload below",
               methods={"agent": {"max_downsample": 2}, "isolation": {}, "dense": {}}),
        Preset("sd1.5", "unet", "image", "stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion 1.5",
               {"height": 512, "width": 512, "num_inference_steps": 50, "guidance_scale": 7.5}, dtype="float16",
               offload="fits 6 GB", methods={"agent": {"max_downsample": 1}, "dense": {}}),
        Preset("animatediff", "unet", "video", "emilianJR/epiCRealism", "AnimateDiff (SD 1.5 + motion adapter v1-5-2)",
               {"height": 512, "width": 512, "num_frames": 16, "num_inference_steps": 25, "guidance_scale": 7.5},
               dtype="float16", offload="fits 12 GB at 16 frames; long videos: VAE slicing",
               methods={"freenoise": {"context_length": 16, "context_stride": 4},
                        "freelong": {"local_window": 16}, "dense": {}},
               extra={"motion_adapter": "guoyww/animatediff-motion-adapter-v1-5-2"}),
        Preset("playground-v2.5", "unet", "image", "playgroundai/playground-v2.5-1024px-aesthetic",
               "Playground v2.5 (SDXL architecture)",
               {"height": 768, "width": 1280, "num_inference_steps": 50, "guidance_scale": 7.0}, dtype="float16",
               offload="fits 12 GB", methods={"isolation": {"start_layer": 36}, "agent": {"max_downsample": 2},
                                             "dense": {}}),
    )
}  # fmt: skip

TOY_NOTE = "trained toy model: coloured shapes of attnpack's procedural world, offline; see its model card"
TOY_PRESETS = {"toy-image": "image", "toy-video": "video"}
for _name, _kind in TOY_PRESETS.items():
    PRESETS[_name] = Preset(
        _name, "flux" if _kind == "image" else "wan", _kind, f"assets/{_name}",
        ("FLUX-family" if _kind == "image" else "Wan-family") + f" toy {_kind} model ({TOY_NOTE})",
        dict(TOY_GEOMETRY[_kind].call), dtype="float32", methods=TOY_METHODS[_kind],
    )  # fmt: skip

TINY_METHODS = {
    "unet": {"agent": {"max_downsample": 2}, "isolation": {"start_layer": 0}, "dense": {}},
    "sd3": {"clear": {"radius": 3}, "dense": {}},
    "wan": {"radial": {"block_size": 16}, "freenoise": {"context_length": 2, "context_stride": 1},
            "freelong": {"local_window": 2}, "trajectory": {}, "pooled_agent": {"agent_grid": 1}, "dense": {}},
    "cogvideox": {"radial": {"block_size": 16}, "trajectory": {}, "dense": {}},
    "hunyuan_video": {"radial": {"block_size": 16}, "trajectory": {}, "dense": {}},
}  # fmt: skip
TINY_VIDEO = {
    "tiny-animatediff",
    "tiny-wan-t2v",
    "tiny-wan2.2",
    "tiny-wan-i2v",
    "tiny-cogvideox",
    "tiny-hunyuanvideo",
}
for _tiny in TINY_PIPELINES.values():
    if _tiny.name == "tiny-flux":
        continue  # toy-image stands in for it (the random one remains for the tests)
    _methods = dict(TINY_METHODS[_tiny.family])
    if _tiny.name == "tiny-animatediff":
        _methods = {
            "freenoise": {"context_length": 2, "context_stride": 1},
            "freelong": {"local_window": 2},
            "dense": {},
        }
    PRESETS[_tiny.name] = Preset(
        _tiny.name, _tiny.family, "video" if _tiny.name in TINY_VIDEO else "image", "tiny",
        f"{_tiny.description} ({RANDOM_WEIGHTS_NOTE})", tiny_call_kwargs(_tiny.name), dtype="float32",
        methods=_methods,
    )  # fmt: skip


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def load_preset(name: str, *, device: str | None = None):
    """The preset's pipeline: tiny ones built from configs; real ones through `from_pretrained` (an offline
    or missing model gives an error naming the id and how to get it)."""
    preset = get_preset(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if preset.is_tiny:
        pipe = build_tiny_pipeline(name)
        return pipe.to(device)
    if preset.is_toy:
        from ..training.toy_models import load_toy

        try:
            return load_toy(TOY_PRESETS[name], device=device)
        except FileNotFoundError as error:
            raise ModelUnavailable(f"preset {name!r}: {error}") from error
    import diffusers

    dtype = getattr(torch, preset.dtype)
    try:
        components = {}
        if "motion_adapter" in preset.extra:
            components["motion_adapter"] = diffusers.MotionAdapter.from_pretrained(
                preset.extra["motion_adapter"], torch_dtype=dtype
            )
            pipe = diffusers.AnimateDiffPipeline.from_pretrained(
                preset.model, torch_dtype=dtype, **components
            )
        else:
            pipe = diffusers.DiffusionPipeline.from_pretrained(preset.model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelUnavailable(
            f"preset {name!r}: the model {preset.model!r} cannot be loaded ({str(error).splitlines()[0]}). "
            f"Download it while online (huggingface-cli download {preset.model}) or use a tiny preset offline"
        ) from error
    return pipe.to(device)


class ModelUnavailable(RuntimeError):
    """Weights that are missing or cannot be fetched (offline): the message says which and how to get them."""
