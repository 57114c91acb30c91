"""Data generator (format, determinism, disjoint splits) and a CPU smoke run of the D2F trainer."""

import json

import torch

from lopa.problems.gsm import extract_answer, math_split, prompt_for, split_of
from lopa.train.trainer import TrainConfig, make_batch, train


def test_problems_are_gsm8k_shaped_and_reproducible():
    a, b = math_split("test", 50, seed=3), math_split("test", 50, seed=3)
    assert a == b
    for ex in a:
        assert ex["answer"].splitlines()[-1].startswith("#### ")
        assert extract_answer(ex["answer"]).lstrip("-").isdigit()
        assert split_of(ex["question"]) == "test"
    assert prompt_for(a[0]).startswith("Question: ")


def test_splits_share_no_question():
    train = {ex["question"] for ex in math_split("train", 3000)}
    test = {ex["question"] for ex in math_split("test", 300)}
    val = {ex["question"] for ex in math_split("validation", 300)}
    assert not (train & test) and not (train & val) and not (test & val)


def test_answers_have_free_choices():
    answers = [ex["answer"] for ex in math_split("train", 400)]
    openings = {a.splitlines()[0] for a in answers}
    assert len(openings) > 20  # several phrasings and optional lines, not one fixed template


def test_batch_masks_increase_block_by_block():
    cfg = TrainConfig(block_size=4)
    pairs = [([1, 2, 3], list(range(10, 26)))] * 200  # 4 answer blocks
    tokens, targets, loss_mask, block = make_batch(pairs, cfg, mask_id=99, eos=98, rng=torch.Generator().manual_seed(0))
    assert (tokens[loss_mask] == 99).all() and not loss_mask[:, :3].any()
    per_block = [loss_mask[:, 3 + 4 * j: 7 + 4 * j].float().mean().item() for j in range(4)]
    assert per_block == sorted(per_block)  # later blocks are more masked on average
    assert block[0, :3].tolist() == [0, 0, 0] and block[0, 3:7].tolist() == [1] * 4


def test_training_smoke_loss_decreases_and_folder_loads(tmp_path):
    import lopa

    out = train(TrainConfig(out=str(tmp_path / "m"), minutes=0.25, max_steps=120, batch_size=16, n_train=500,
                            hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                            vocab_size=320, warmup_steps=5, device="cpu", log_every=10), progress=False)
    log = json.loads((out / "train_log.json").read_text())["log"]
    assert log[-1][2] < log[0][2]
    model = lopa.load_model(out, runner=lopa.RunnerConfig(device="cpu"))
    assert model.model_type == "dream" and (out / "loss.png").exists()


def test_training_pool_mixes_code_tasks_in_the_eval_prompt_format():
    from lopa.eval.tasks import code
    from lopa.train.trainer import training_texts

    texts = training_texts(TrainConfig(n_train=20, n_code=10, code_copies=2))
    assert len(texts) == 20 + 10 * 2
    assert all(p.startswith("Question: ") for p, _ in texts[:20])
    code_prompts = {p for p, _ in texts[20:]}
    assert len(code_prompts) == 10 and all(p.startswith("def ") and '"""' in p for p in code_prompts)
    assert not code_prompts & {prob.prompt for prob in code(50)}  # the code test split is held out
    assert training_texts(TrainConfig(n_train=5, n_code=0)) == training_texts(TrainConfig(n_train=5, n_code=0))[:5]


def test_block_diffusion_objective_sees_what_inference_sees(tiny_sdar_dir):
    """The noisy copy's hidden states under the training mask equal an inference forward over the clean
    finished blocks and the noisy active block (block-causal), at the same positions."""
    from lopa.models.attention import block_causal_mask
    from lopa.models.loader import load_folder
    from lopa.train.block_diffusion import bd_mask, make_bd_batch

    loaded = load_folder(tiny_sdar_dir, dtype=torch.float64)
    model, S, mask = loaded.model, loaded.config.block_size, loaded.spec.mask_id
    prompt, answer = [5, 6, 7, 8, 9], list(range(20, 30))  # blocks of 4: the prompt straddles block 1
    tokens, targets, loss_mask = make_bd_batch([(prompt, answer)], S, mask, 98, torch.Generator().manual_seed(0))
    T = targets.shape[1]
    assert T == 16 and tokens.shape == (1, 2 * T) and torch.equal(tokens[0, T:], targets[0])
    assert not loss_mask[0, :5].any() and (tokens[0, :T][loss_mask[0]] == mask).all()  # only answer positions masked
    m = bd_mask(T, S)
    assert m[5, 4] and not m[5, T + 4] and m[5, T + 3] and not m[T + 3, 3]  # noisy block 1 sees itself, clean block 0
    with torch.no_grad():
        hidden = model(tokens, attn_mask=m, positions=torch.arange(T).repeat(2))
        for b in range(T // S):
            seq = torch.cat([targets[0, : b * S], tokens[0, b * S: (b + 1) * S]])[None]  # clean before, noisy block b
            ref = model(seq, attn_mask=block_causal_mask(torch.arange(seq.shape[1]) // S))
            torch.testing.assert_close(hidden[0, b * S: (b + 1) * S], ref[0, b * S:], atol=1e-10, rtol=1e-10)


def test_block_diffusion_training_smoke_writes_an_sdar_folder(tmp_path):
    import lopa

    out = train(TrainConfig(out=str(tmp_path / "bd"), minutes=0.25, max_steps=60, batch_size=8, n_train=200, n_code=0,
                            hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                            vocab_size=320, warmup_steps=5, device="cpu", log_every=10, block_size=4,
                            objective="block_diffusion"), progress=False)
    log = json.loads((out / "train_log.json").read_text())["log"]
    assert log[-1][2] < log[0][2]
    model = lopa.load_model(out, runner=lopa.RunnerConfig(device="cpu"))
    assert model.model_type == "sdar" and model.loaded.spec.block_size == 4
    own = lopa.generate(model, "Question: 1 + 2?", strategy="sdar", gen_length=8)
    branched = lopa.generate(model, "Question: 1 + 2?", strategy="lopa", base="sdar", k=3, gen_length=8)
    assert own.stats.decode_forwards >= 1 and branched.stats.branch_rows >= branched.stats.decode_forwards
