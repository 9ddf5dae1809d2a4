"""Benchmark presets: the shapes of the per-layer cases and of the end-to-end Llama-style model.

`anchors` is the device default and reproduces /work/shared/ANCHORS.md: layer cases at
M8192 4096→4096 (r16, alpha 32), prefix attention B8 H32 T1024 D128, and the 8-layer model with
hidden 2048, MLP 5632, 16 heads, vocab 32000 at batch 8 × 1024.  `tiny` is the CPU default.
`1b` / `7b` use 1B-class / 7B-class layer shapes (the 7B-class model keeps 4 layers so that the
reference, torch.compile and fastpeft copies fit on one 80 GB device together).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Preset:
    name: str
    batch: int
    seq: int
    layer_hidden: int  # K = N of the square per-layer cases; head_dim = layer_hidden / layer_heads
    layer_mlp: int
    layer_heads: int
    model: ModelShape
    rank: int = 16
    alpha: int = 32
    virtual_tokens: int = 32
    description: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", batch=2, seq=32, layer_hidden=64, layer_mlp=176, layer_heads=4,
                   model=ModelShape(hidden=64, mlp=176, heads=4, kv_heads=4, layers=2, vocab=512),
                   virtual_tokens=8, description="CPU-sized shapes"),
    "small": Preset("small", batch=4, seq=128, layer_hidden=256, layer_mlp=688, layer_heads=8,
                    model=ModelShape(hidden=256, mlp=688, heads=8, kv_heads=8, layers=4, vocab=4096),
                    virtual_tokens=16, description="small shapes for a quick GPU smoke run"),
    "anchors": Preset("anchors", batch=8, seq=1024, layer_hidden=4096, layer_mlp=11008, layer_heads=32,
                      model=ModelShape(hidden=2048, mlp=5632, heads=16, kv_heads=16, layers=8, vocab=32000),
                      description="the shapes of the project's published GPU baselines and targets"),
    "1b": Preset("1b", batch=8, seq=1024, layer_hidden=2048, layer_mlp=8192, layer_heads=32,
                 model=ModelShape(hidden=2048, mlp=8192, heads=32, kv_heads=8, layers=16, vocab=128256),
                 description="Llama-3.2-1B-class shapes, 16 layers"),
    "7b": Preset("7b", batch=4, seq=1024, layer_hidden=4096, layer_mlp=11008, layer_heads=32,
                 model=ModelShape(hidden=4096, mlp=11008, heads=32, kv_heads=32, layers=4, vocab=32000),
                 description="Llama-2-7B-class layer shapes, 4 layers"),
}


def get_preset(name: str, batch: int | None = None, seq: int | None = None) -> Preset:
    preset = PRESETS[name]
    if batch is not None:
        preset = replace(preset, batch=batch)
    if seq is not None:
        preset = replace(preset, seq=seq)
    return preset
