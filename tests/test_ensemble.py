"""fastpeft.ensemble: n prompts or adapters in one batch equal n separate runs (next-token log-probs,
label scores with multi-token labels, combined predictions by vote and by mean log-probability, greedy
generation), and misuse is refused by name."""

import pytest
import torch

import fastpeft
from fastpeft.ensemble import _combine

from models import tiny_llama


def _prompt_model(method="prompt"):
    cfg = {"prompt": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
           "prefix": lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
           "lora": lambda: fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
           }[method]
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(tiny_llama(seed=0), cfg(), adapter_name="m0")
    for name in ("m1", "m2"):
        model.add_adapter(name, cfg())
    if method != "lora":  # distinct prompts (a fresh prompt table is random already; prefix tables too)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "m1" in n or "m2" in n:
                    p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    return ids, mask


def _alone(model, name, ids, mask):
    """Logits of `ids` with only adapter `name`, the virtual-token positions dropped."""
    model.set_adapter(name)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[:, logits.shape[1] - ids.shape[1]:].float()


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_ensemble_in_one_batch_equals_separate_runs(method):
    model = _prompt_model(method)
    ids, mask = _inputs()
    kind = dict(adapters=["m0", "m1", "m2"]) if method == "lora" else dict(prompts=["m0", "m1", "m2"])
    ens = fastpeft.ensemble(model, **kind)
    got = ens.next_token_logprobs(ids, mask)
    last = mask.sum(-1) - 1
    labels = [[5], [9, 11], [30, 31, 32]]
    out = ens.classify(ids, mask, labels=labels)
    for k, name in enumerate(["m0", "m1", "m2"]):
        logits = _alone(model, name, ids, mask)
        want = torch.log_softmax(logits[torch.arange(3), last], -1)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)
        for j, lab in enumerate(labels):  # each label's sequence scored separately, teacher-forced
            for i in range(3):
                n = int(mask[i].sum())
                seq = torch.tensor([ids[i, :n].tolist() + lab])
                lp = torch.log_softmax(_alone(model, name, seq, torch.ones_like(seq))[0], -1)
                want_score = sum(lp[n - 1 + t, tok] for t, tok in enumerate(lab))
                torch.testing.assert_close(out.member_scores[k, i, j], want_score, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got[0], got[1])  # the members really differ
    mean = out.member_scores.mean(0)
    torch.testing.assert_close(out.scores, mean)
    assert torch.equal(out.prediction, mean.argmax(-1))
    assert torch.equal(out.member_prediction, out.member_scores.argmax(-1))


def test_vote_takes_the_majority_and_breaks_ties_by_mean_logprob():
    member = torch.log_softmax(torch.tensor([
        [[3.0, 0.0, 0.0], [0.0, 0.1, 0.0]],
        [[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
        [[0.0, 9.0, 0.0], [0.0, 0.2, 0.0]],
    ]), -1)  # (n=3, B=2, C=3)
    votes, choice = _combine(member, "vote")
    assert votes.tolist() == [[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
    assert choice.tolist() == [0, 1]  # row 0: label 0 wins 2-1 although label 1 has the best single score
    tie = member[:2]  # row 1: one vote each for labels 1 and 2 -> the higher mean log-probability (label 2)
    votes, choice = _combine(tie, "vote")
    assert votes[1].tolist() == [0.0, 1.0, 1.0] and choice[1].item() == 2
    _, mean_choice = _combine(member, "mean_logprob")
    assert mean_choice.tolist() == member.mean(0).argmax(-1).tolist()


def test_ensemble_generate_combines_each_step():
    model = _prompt_model("lora")
    ids, mask = _inputs()
    ens = fastpeft.ensemble(model, adapters=["m0", "m1", "m2"], combine="mean_logprob")
    out = ens.generate(ids, mask, max_new_tokens=4)
    assert out.shape == (3, 11)
    seq, seq_mask = ids.clone(), mask.clone()
    for step in range(4):  # the combined greedy choice, recomputed by hand from separate runs
        lps = []
        for name in ("m0", "m1", "m2"):
            logits = _alone(model, name, seq, seq_mask)
            lps.append(torch.log_softmax(logits[torch.arange(3), seq_mask.sum(-1) - 1], -1))
        token = torch.stack(lps).mean(0).argmax(-1)
        ends = seq_mask.sum(-1)
        seq = torch.cat([seq, torch.zeros((3, 1), dtype=seq.dtype)], 1)
        seq_mask = torch.cat([seq_mask, torch.zeros((3, 1), dtype=seq_mask.dtype)], 1)
        seq[torch.arange(3), ends] = token
        seq_mask[torch.arange(3), ends] = 1
    assert torch.equal(out, seq)
    assert out[1, 5:9].ne(0).all() and out[1, 9:].eq(0).all()  # new tokens follow row 1's own end


def test_ensemble_refuses_misuse():
    model = _prompt_model("lora")
    with pytest.raises(ValueError, match="not both"):
        fastpeft.ensemble(model, prompts=["m0"], adapters=["m1"])
    with pytest.raises(ValueError, match="adapters=\\[...\\] for LoRA"):
        fastpeft.ensemble(model, prompts=["m0", "m1"])
    with pytest.raises(ValueError, match="unknown adapter"):
        fastpeft.ensemble(model, adapters=["m0", "zz"])
    with pytest.raises(ValueError, match="at least two"):
        fastpeft.ensemble(model, adapters=["m0"])
    with pytest.raises(ValueError, match="combine must be one of"):
        fastpeft.ensemble(model, adapters=["m0", "m1"], combine="max")
    ens = fastpeft.ensemble(model, adapters=["m0", "m1"])
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="two or more non-empty"):
        ens.classify(ids, mask, labels=[[5]])
    mask[0] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        ens.next_token_logprobs(ids, mask)


def test_eval_cli_scores_each_adapter_and_the_ensemble(tmp_path, capsys):
    """`fastpeft eval --adapter A --adapter B --labels ... --ensemble mean_logprob`: each adapter's accuracy
    and the ensemble's, as the Python API computes them; without --labels each adapter's eval loss."""
    import json

    from fastpeft.cli import main
    from fastpeft.training import build_preset, load_model

    _, tokenizer, _ = load_model("tiny")
    folders = []
    for k in range(2):
        torch.manual_seed(10 + k)
        pm = fastpeft.get_peft_model(build_preset("tiny"), fastpeft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        pm.save_pretrained(tmp_path / f"ad{k}")
        folders.append(str(tmp_path / f"ad{k}"))
    prompts = ["the red bee sat on the", "the blue cat sat on the", "a dog ran to the", "one two"]
    labels = ["rug.", "mat.", "box."]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": labels[i % 3]}) + "\n" for i, p in enumerate(prompts)))
    argv = ["eval", "--model", "tiny", "--adapter", folders[0], "--adapter", folders[1], "--data", str(data),
            "--labels", ",".join(labels), "--ensemble", "mean_logprob", "--batch-size", "3"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # the same through the Python API
    model = fastpeft.PeftModel.from_pretrained(build_preset("tiny"), folders[0], adapter_name="ad0")
    model.load_adapter(folders[1], adapter_name="ad1")
    model.eval()
    ens = fastpeft.ensemble(model, adapters=["ad0", "ad1"])
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    out = ens.classify(ids, mask, labels=[tokenizer.encode(" " + t, add_special_tokens=False) for t in labels])
    answers = torch.tensor([i % 3 for i in range(len(prompts))])
    want = [f"ad{k}: accuracy {float((out.member_prediction[k] == answers).float().mean()):.4f} (4 records)"
            for k in range(2)]
    want.append(f"ensemble (mean_logprob, 2 adapters in one batch): accuracy "
                f"{float((out.prediction == answers).float().mean()):.4f}")
    assert lines == want

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    assert main(["eval", "--model", "tiny", "--adapter", folders[0], "--data", str(text)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ad0: eval loss ") and line.endswith("(4 records)")
    assert main(["eval", "--model", "tiny", "--adapter", folders[0], "--data", str(data), "--labels", "a,b",
                 "--ensemble", "vote"]) == 2
    assert "two or more --adapter" in capsys.readouterr().err
