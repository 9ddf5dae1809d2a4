"""Fine-tune a tiny Llama with LoRA, save the adapter, reload it, and check the logits match.

    python examples/finetune_lora.py

Runs on a CPU in well under a minute with no downloads: the base model is the `tiny` preset
(a 2-layer, hidden-64 Llama built from a config with seeded random weights) and the data is the
small dataset shipped with fastpeft (arithmetic and patterned sentences, byte-tokenised).
The adapter folder is PEFT's format: `peft.PeftModel.from_pretrained` loads it too.
"""

import os
import tempfile

import torch

import fastpeft
from fastpeft.training import DEFAULT_DATA, ByteTokenizer, build_preset, train

torch.set_num_threads(1)  # the model is tiny: one thread beats several, and never oversubscribes the CPU


def main() -> None:
    # 1. a base model (random weights, seed 0) and a LoRA config on every linear layer
    base = build_preset("tiny", seed=0)
    config = fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    # 2. fine-tune: AdamW, warm-up + cosine, loss on every token; the loss is printed every 10 steps
    print(f"training on {DEFAULT_DATA}")
    losses = []

    def report(trainer, logs):  # called after every optimizer step; logs carry "loss" every log_every steps
        if "loss" in logs:
            losses.append(logs["loss"])
            print(f"step {logs['step']:4d}  loss {logs['loss']:.3f}  ({logs['tokens_per_s']:,.0f} tokens/s)")

    model = train(base, config, DEFAULT_DATA, max_steps=150, batch_size=16, learning_rate=1e-2, log_every=10,
                  seed=0, progress=False, callbacks=[report])
    model.print_trainable_parameters()
    assert losses[-1] < losses[0] - 1.0, f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"

    with tempfile.TemporaryDirectory() as out:
        # 3. save the adapter (adapter_config.json + adapter_model.safetensors, as PEFT writes them)
        model.save_pretrained(out)
        print(f"adapter files: {sorted(os.listdir(out))}")

        # 4. reload it onto a fresh copy of the same base model
        fresh = build_preset("tiny", seed=0)
        reloaded = fastpeft.PeftModel.from_pretrained(fresh, out)

    # 5. the reloaded model computes the same logits as the trained one
    tokenizer = ByteTokenizer()
    batch = tokenizer(["3 + 4 = 7", "the red cat sat on the mat."], padding=True, return_tensors="pt")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = model(**batch).logits
        b = reloaded(**batch).logits
    diff = (a - b).abs().max().item()
    print(f"max |logits(trained) - logits(reloaded)| = {diff:.3e}")
    assert diff < 1e-5, diff
    with torch.no_grad(), reloaded.disable_adapter():
        base_diff = (reloaded(**batch).logits - a).abs().max().item()
    print(f"max |logits(base) - logits(trained)|     = {base_diff:.3e}  (the adapter's effect)")

    # 6. greedy generation with the adapter
    prompt = "the red"
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out_ids = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                    do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    print(f"generate({prompt!r}) -> {prompt + tokenizer.decode(out_ids[0, ids.shape[1]:])!r}")


if __name__ == "__main__":
    main()
