"""Loading HF folders: round trip, sharding, typed errors, tokenizer parity with transformers, LoRA vs PEFT."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa.errors import AdapterError, CheckpointError, UnsupportedModelError
from lopa.models.loader import load_folder, save_folder
from lopa.models.tiny import write_tiny_adapter, write_tiny_checkpoint
from lopa.models.tokenizer import Tokenizer


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_save_load_round_trip_is_exact(family, request, tmp_path):
    src = request.getfixturevalue(f"tiny_{family}_dir")
    first = load_folder(src)
    save_folder(first.model, src, tmp_path / "again")
    second = load_folder(tmp_path / "again")
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_file(str(src / "model.safetensors")).keys() == load_file(str(tmp_path / "again" / "model.safetensors")).keys()


def test_real_checkpoint_names(tiny_dream_dir, tiny_llada_dir):
    dream = load_file(str(tiny_dream_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in dream and "lm_head.weight" in dream
    llada = load_file(str(tiny_llada_dir / "model.safetensors"))
    assert "model.transformer.blocks.1.ff_proj.weight" in llada and "model.transformer.ff_out.weight" in llada
    assert json.loads((tiny_dream_dir / "config.json").read_text())["model_type"] == "Dream"


def test_sharded_checkpoint_loads_identically(tiny_dream_dir, tmp_path):
    folder = _copy(tiny_dream_dir, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_folder(tiny_dream_dir).model, load_folder(folder).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_folder_and_files(tmp_path, tiny_dream_dir):
    with pytest.raises(CheckpointError, match="not found"):
        load_folder(tmp_path / "nope")
    folder = _copy(tiny_dream_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_folder(folder)


def test_corrupt_weights_and_config(tiny_dream_dir, tmp_path):
    folder = _copy(tiny_dream_dir, tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_folder(folder)
    folder = _copy(tiny_dream_dir, tmp_path, "c2")
    (folder / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="JSON"):
        load_folder(folder)


def test_shape_mismatch_names_the_tensor(tiny_dream_dir, tmp_path):
    folder = _copy(tiny_dream_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight"):
        load_folder(folder)


def test_missing_tensor_and_wrong_family(tiny_dream_dir, tmp_path):
    folder = _copy(tiny_dream_dir, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        load_folder(folder)
    folder = _copy(tiny_dream_dir, tmp_path, "f2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_folder(folder)


@pytest.mark.parametrize("fmt", ["json", "bpe"])
def test_tokenizer_matches_transformers_qwen2(tmp_path, fmt):
    from transformers import Qwen2Tokenizer, Qwen2TokenizerFast

    folder = write_tiny_checkpoint(tmp_path / fmt, tokenizer=fmt)
    ours = Tokenizer(folder)
    if fmt == "bpe":
        ref = Qwen2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), errors="replace",
                             unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        ref.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|mask|>"]})
    else:
        ref = Qwen2TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    texts = ["Tom has 12 apples and buys 345 more.", "  leading spaces\nand\n\nnewlines\t tabs",
             "<|im_start|>user\nHi<|im_end|>\n<|mask|><|mask|> x", "café naïve 数学 😀", "def f(x):\n    return x**2"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False)
    assert [ours.token_id(t) for t in ("<|mask|>", "<|endoftext|>")] == ref.convert_tokens_to_ids(["<|mask|>", "<|endoftext|>"])
    assert ours.encode("2024") == [ours.token_id(d) for d in "2024"]  # digits split one by one


def test_chat_template(tiny_dream_dir):
    tok = Tokenizer(tiny_dream_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_lora_merge_equals_peft(tiny_dream_dir, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    adapter = write_tiny_adapter(tmp_path / "adapter", tiny_dream_dir)
    merged = load_folder(tiny_dream_dir, adapter=adapter).model
    base = load_folder(tiny_dream_dir).model
    cfg = base.config
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                      tie_word_embeddings=False))
    tensors = load_file(str(tiny_dream_dir / "model.safetensors"))
    hf.load_state_dict(tensors, strict=False)
    peft_merged = PeftModel.from_pretrained(hf, str(adapter)).merge_and_unload()
    ref = peft_merged.state_dict()
    q = cfg.num_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        torch.testing.assert_close(merged.layers[i].attn.qkv.weight[:q], ref[f"model.layers.{i}.self_attn.q_proj.weight"])
        gate = merged.layers[i].mlp.gate_up.weight.chunk(2)[0]
        torch.testing.assert_close(gate, ref[f"model.layers.{i}.mlp.gate_proj.weight"])
    assert not torch.equal(merged.layers[0].attn.qkv.weight, base.layers[0].attn.qkv.weight)


def test_adapter_for_another_base_is_rejected(tiny_dream_dir, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "wide", hidden_size=96, num_heads=4, num_kv_heads=2)
    adapter = write_tiny_adapter(tmp_path / "adapter", other)
    with pytest.raises(AdapterError, match="does not fit"):
        load_folder(tiny_dream_dir, adapter=adapter)
    with pytest.raises(AdapterError, match="missing"):
        load_folder(tiny_dream_dir, adapter=tmp_path / "no-adapter")


def test_llada_switches_we_do_not_compute_are_rejected(tiny_llada_dir, tmp_path):
    for field, value in [("scale_logits", True), ("alibi", True), ("include_bias", True), ("block_type", "sequential")]:
        folder = _copy(tiny_llada_dir, tmp_path, field)
        cfg = json.loads((folder / "config.json").read_text())
        cfg[field] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedModelError, match=field):
            load_folder(folder)
