"""AdapterHub (`adapters`) interchange fixtures for fastpeft's bottleneck adapters, both directions.

`adapters` 1.3 requires transformers 4.57 and fastpeft transformers 5, so the `adapters` side runs in a
side environment that reuses the system torch:

    python -m venv --system-site-packages /tmp/ahenv
    /tmp/ahenv/bin/pip install "transformers==4.57.*" adapters

Modes (run from the repository root):

1. AdapterHub -> fastpeft: write the fixtures (side environment)

       /tmp/ahenv/bin/python tools/make_adapterhub_fixtures.py [--out tests/fixtures/adapterhub]

   builds a tiny Llama (LlamaForCausalLM) and a tiny BERT (BertForMaskedLM) from configs with fixed
   seeds, adds a Pfeiffer (`SeqBnConfig`) and a Houlsby (`DoubleSeqBnConfig`) adapter to each with
   `adapters`, gives every adapter tensor random non-zero values (a fresh adapter is near the identity and
   would prove nothing), and writes

       base-<family>/model.safetensors, base-<family>/config.json   the base model (weights, config kwargs)
       <family>-<method>/adapter/                                  `model.save_adapter(...)`'s files
       <family>-<method>/case.json                                 family, base folder, adapter name
       <family>-<method>/expected.safetensors                      input_ids, fp32 logits with the adapter
                                                                   (`logits`) and without it (`base_logits`)

   `tests/test_adapterhub.py` loads each case into fastpeft and compares the logits (<= 1e-5, fp32).

2. fastpeft -> AdapterHub: export with fastpeft (main environment), check with `adapters` (side one)

       python tools/make_adapterhub_fixtures.py --export /tmp/fp2ah
       /tmp/ahenv/bin/python tools/make_adapterhub_fixtures.py --check /tmp/fp2ah

   `--export` builds fastpeft Pfeiffer and Houlsby adapters (random weights) on the fixtures' base
   models, saves them with `fastpeft.save_adapterhub_adapter` and writes the same case layout, with the
   logits fastpeft computes; `--check` loads every case folder under the directory into `adapters`
   (`model.load_adapter(...)`), compares the logits with the stored ones (<= 1e-5) and exits non-zero on
   a mismatch.  `--check` also accepts the fixtures folder itself (AdapterHub against its own files).
   The tests run step 2 themselves when FASTPEFT_ADAPTERHUB_PYTHON names the side environment's python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

FAMILIES = {
    # tiny configs: hidden 32, 2 layers, 4 heads, vocab 100 (the tests rebuild the same models from them)
    "llama": ("LlamaForCausalLM", dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)),
    "bert": ("BertForMaskedLM", dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
}
# case suffix -> (AdapterHub config class, its arguments); bottleneck 8 / 4 / 8 on hidden 32
METHODS = {"pfeiffer": ("SeqBnConfig", dict(reduction_factor=4)),
           "houlsby": ("DoubleSeqBnConfig", dict(reduction_factor=8)),
           "pfeiffer-rbl-false": ("SeqBnConfig", dict(reduction_factor=4, residual_before_ln=False))}
TOL = 1e-5


def build_model(family: str, seed: int | None = None):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    cfg_cls = {"llama": transformers.LlamaConfig, "bert": transformers.BertConfig}[family]
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(transformers, cls_name)(cfg_cls(**kwargs)).eval()


def load_base(family: str, base_dir: str):
    from safetensors.torch import load_file

    model = build_model(family)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(base_dir, "model.safetensors")), strict=False)
    # tied copies and non-persistent buffers may be named differently across transformers versions
    if [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))] or unexpected:
        raise RuntimeError(f"{base_dir}: base weights do not fit: missing {missing}, unexpected {unexpected}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def input_ids(seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (2, 9), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def save_base(model, family: str, out: str) -> str:
    from safetensors.torch import save_file

    base_dir = os.path.join(out, f"base-{family}")
    os.makedirs(base_dir, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(base_dir, "model.safetensors"))
    os.chmod(os.path.join(base_dir, "model.safetensors"), 0o644)
    with open(os.path.join(base_dir, "config.json"), "w") as fh:
        json.dump({"family": family, "class": FAMILIES[family][0], "config": FAMILIES[family][1]}, fh, indent=2,
                  sort_keys=True)
    return base_dir


def write_case(case_dir: str, family: str, base_rel: str, adapter_name: str, ids, with_adapter, without_adapter,
               producer: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(case_dir, exist_ok=True)
    with open(os.path.join(case_dir, "case.json"), "w") as fh:
        json.dump({"family": family, "base": base_rel, "adapter_name": adapter_name, "producer": producer,
                   "tolerance": TOL}, fh, indent=2, sort_keys=True)
    save_file({"input_ids": ids.contiguous(), "logits": with_adapter.contiguous(),
               "base_logits": without_adapter.contiguous()}, os.path.join(case_dir, "expected.safetensors"))
    os.chmod(os.path.join(case_dir, "expected.safetensors"), 0o644)


def _randomize(model, adapter_name: str, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".adapters.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                n += 1
    return n


# ----------------------------------------------------------------------------- mode 1: adapters -> files
def make_fixtures(out: str) -> None:
    import adapters
    import transformers

    print(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    ids = input_ids()
    for fi, family in enumerate(FAMILIES):
        base = build_model(family, seed=100 + fi)
        with torch.no_grad():  # norms start at weight 1, bias 0: move them, so that where an LN sits matters
            g = torch.Generator().manual_seed(200 + fi)
            for pname, p in base.named_parameters():
                if "norm" in pname.lower():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        base_dir = save_base(base, family, out)
        base_logits = logits(base, ids)
        for mi, (method, (cfg_name, cfg_kwargs)) in enumerate(METHODS.items()):
            model = load_base(family, base_dir)
            adapters.init(model)
            name = f"{method.replace('-', '_')}_{family}"
            model.add_adapter(name, config=getattr(adapters, cfg_name)(**cfg_kwargs))
            n = _randomize(model, name, seed=1000 + 10 * fi + mi)
            assert n > 0, "no adapter parameter found"
            model.set_active_adapters(name)
            model.eval()
            out_logits = logits(model, ids)
            assert (out_logits - base_logits).abs().max() > 1e-2, "the adapter changes nothing"
            case_dir = os.path.join(out, f"{family}-{method}")
            os.makedirs(case_dir, exist_ok=True)
            model.save_adapter(os.path.join(case_dir, "adapter"), name, with_head=False)
            write_case(case_dir, family, f"../base-{family}", name, ids, out_logits, base_logits,
                       producer=f"adapters {adapters.__version__} / transformers {transformers.__version__}")
            print(f"{case_dir}: {n} adapter tensors, |logits - base| max "
                  f"{(out_logits - base_logits).abs().max():.3g}")


# ----------------------------------------------------------------------------- mode 2a: fastpeft -> files
def export_fastpeft(out: str, fixtures: str) -> None:
    import copy

    import fastpeft

    ids = input_ids(seed=4321)
    for fi, family in enumerate(FAMILIES):
        src = os.path.join(fixtures, f"base-{family}")
        base = load_base(family, src)
        base_dir = save_base(base, family, out)
        base_logits = logits(base, ids)
        for mi, (method, (cfg_name, cfg_kwargs)) in enumerate(METHODS.items()):
            cfg = fastpeft.BottleneckConfig(
                non_linearity="relu" if cfg_name == "SeqBnConfig" else "swish", init_weights="random",
                original_ln_before=cfg_name == "SeqBnConfig", mh_adapter=cfg_name == "DoubleSeqBnConfig",
                **cfg_kwargs)
            torch.manual_seed(2000 + 10 * fi + mi)
            model = fastpeft.get_peft_model(copy.deepcopy(base), cfg).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.3)
            out_logits = logits(model, ids)
            name = f"fastpeft_{method.replace('-', '_')}_{family}"
            case_dir = os.path.join(out, f"{family}-{method}")
            fastpeft.save_adapterhub_adapter(model, os.path.join(case_dir, "adapter"), adapterhub_name=name)
            write_case(case_dir, family, f"../base-{family}", name, ids, out_logits, base_logits,
                       producer=f"fastpeft {getattr(fastpeft, '__version__', '?')}")
            print(f"{case_dir}: written by fastpeft")


# ----------------------------------------------------------------------------- mode 2b: files -> adapters
def check(directory: str) -> int:
    import adapters
    from safetensors.torch import load_file

    failures = 0
    cases = sorted(d for d in os.listdir(directory) if os.path.isfile(os.path.join(directory, d, "case.json")))
    if not cases:
        print(f"no case folders (with case.json) under {directory}")
        return 1
    for case in cases:
        case_dir = os.path.join(directory, case)
        with open(os.path.join(case_dir, "case.json")) as fh:
            meta = json.load(fh)
        expected = load_file(os.path.join(case_dir, "expected.safetensors"))
        model = load_base(meta["family"], os.path.normpath(os.path.join(case_dir, meta["base"])))
        base_err = (logits(model, expected["input_ids"]) - expected["base_logits"]).abs().max().item()
        adapters.init(model)
        name = model.load_adapter(os.path.join(case_dir, "adapter"))
        model.set_active_adapters(name)
        model.eval()
        err = (logits(model, expected["input_ids"]) - expected["logits"]).abs().max().item()
        ok = err <= meta.get("tolerance", TOL)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case}: adapter {name!r} max |logits diff| {err:.3g} "
              f"(base model {base_err:.3g}; producer {meta.get('producer')})")
    return 1 if failures else 0


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(os.path.dirname(here), "tests", "fixtures", "adapterhub")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--check", metavar="DIR", help="load DIR's case folders into `adapters`, compare logits")
    group.add_argument("--export", metavar="DIR", help="write fastpeft-saved cases to DIR (main environment)")
    ap.add_argument("--out", default=default, help="fixtures folder for the default mode (default: %(default)s)")
    ap.add_argument("--fixtures", default=default, help="where --export reads the base models from")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.check)
    if args.export:
        export_fastpeft(args.export, args.fixtures)
        return 0
    make_fixtures(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
