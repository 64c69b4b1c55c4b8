"""The loader reads the official layout strictly and names what is wrong."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_close, frames
from lmcore.errors import CheckpointError
from model import LlavaMini
from model.oracle import OracleLlavaMini
from model.tiny import make_tiny_checkpoint


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_sharded_low_precision_checkpoint_into_float32(tmp_path, stored):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=4, dtype=stored, shards=3, vision_keys_in_checkpoint=True)
    assert (ck / "model.safetensors.index.json").exists() and not (ck / "model.safetensors").exists()
    m = LlavaMini.from_pretrained(ck, vision_tower=ck / "clip-vision", dtype="float32")
    assert m.dtype == torch.float32
    o = OracleLlavaMini.from_pretrained(ck, vision_tower=ck / "clip-vision", dtype=torch.float32)
    ids = m.prompt_ids("what shape is the red object ?")
    px = frames(3, seed=2)
    assert_close(m.video_logits(ids, m.encode_frames(px)), o(ids, px[None, :, None]), atol=1e-4, what="shards")


def _umask() -> int:
    import os
    m = os.umask(0)
    os.umask(m)
    return m


def weight_modes(folder) -> dict[str, int]:
    """Every *.safetensors under `folder`, relative path -> permission bits."""
    return {f.relative_to(folder).as_posix(): f.stat().st_mode & 0o777 for f in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("shards", [1, 2])
def test_written_weights_are_readable_like_every_other_file(tmp_path, shards):
    """safetensors writes through a private temporary file (0600): the weights of a checkpoint made
    here must get the mode the folder's other files get (0666 less the umask), so that another user
    (a Ray worker, a container) can serve it."""
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=1, shards=shards)
    modes = weight_modes(ck)
    assert len(modes) == shards + 1 and "clip-vision/model.safetensors" in modes
    want = 0o666 & ~_umask()
    assert set(modes.values()) == {want}, modes
    assert (ck / "config.json").stat().st_mode & 0o777 == want


def test_dtype_defaults_to_the_checkpoint_and_vision_tower_from_config(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=1, dtype=torch.bfloat16)
    m = LlavaMini.from_pretrained(ck)                      # mm_vision_tower names clip-vision inside the folder
    assert m.dtype == torch.bfloat16 and m.vision.width == 64


def _break(tmp_path, fn):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    sd = load_file(str(ck / "model.safetensors"))
    fn(sd)
    save_file(sd, str(ck / "model.safetensors"))
    return ck


def test_missing_key_is_named(tmp_path):
    ck = _break(tmp_path, lambda sd: sd.pop("model.prefusion_layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"expected key 'model.prefusion_layers.3.mlp.up_proj.weight'"):
        LlavaMini.from_pretrained(ck)


def test_misshaped_key_is_named_with_both_shapes(tmp_path):
    def f(sd):
        sd["model.mm_projector.2.weight"] = torch.zeros(64, 63)
    ck = _break(tmp_path, f)
    with pytest.raises(CheckpointError, match=r"'model.mm_projector.2.weight' of shape \(64, 64\).*got \(64, 63\)"):
        LlavaMini.from_pretrained(ck)


def test_unknown_key_is_named(tmp_path):
    def f(sd):
        sd["model.temporal_router.0.weight"] = torch.zeros(2)
    ck = _break(tmp_path, f)
    with pytest.raises(CheckpointError, match="unknown key 'model.temporal_router.0.weight'"):
        LlavaMini.from_pretrained(ck)


def test_missing_shard_and_missing_weights(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2, shards=2)
    (ck / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        LlavaMini.from_pretrained(ck)
    (ck / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="expected model.safetensors or model.safetensors.index.json"):
        LlavaMini.from_pretrained(ck)


def test_config_errors(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    cfg = json.loads((ck / "config.json").read_text())
    for change, msg in [({"model_type": "llava_llama"}, "model_type 'llava_mini_llama', got 'llava_llama'"),
                        ({"mm_projector_type": "linear"}, "mlp2x_gelu"),
                        ({"hidden_act": "gelu"}, "hidden_act 'silu', got 'gelu'"),
                        ({"resolution_ratio": 2}, "resolution_ratio 1"),
                        ({"hidden_size": None}, "hidden_size"),
                        ({"hidden_size": "abc"}, "expected hidden_size in .* to be a positive whole number, got 'abc'"),
                        ({"vocab_size": 0}, "expected vocab_size in .* to be a positive whole number, got 0"),
                        ({"num_hidden_layers": 2.5}, "num_hidden_layers .* positive whole number, got 2.5"),
                        ({"rms_norm_eps": "small"}, "rms_norm_eps .* positive number, got 'small'"),
                        ({"rope_scaling": [1]}, "rope_scaling .* an object or null"),
                        ({"eos_token_id": "eos"}, "eos_token_id .* a token id or a list"),
                        ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None},
                         "hidden_size divisible by num_attention_heads")]:
        bad = dict(cfg, **change)
        bad = {k: v for k, v in bad.items() if v is not None}
        (ck / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=msg):
            LlavaMini.from_pretrained(ck)


def test_config_that_is_not_an_object_or_has_a_null_size_is_named(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected .*config.json to hold a JSON object, got a JSON array"):
        LlavaMini.from_pretrained(ck)
    (ck / "config.json").write_text(json.dumps(dict(cfg, hidden_size=None)))        # kept, as null
    with pytest.raises(CheckpointError, match="to define hidden_size, got them missing or null"):
        LlavaMini.from_pretrained(ck)


def test_the_checkpoints_own_tower_wins_over_a_same_named_folder_where_it_runs(tmp_path, monkeypatch):
    from model.config import LlavaMiniConfig
    from model.vision import find_vision_tower
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    other = make_tiny_checkpoint(tmp_path / "run" / "other", seed=9)      # a different tower, same name
    shutil.move(other / "clip-vision", tmp_path / "run" / "clip-vision")
    monkeypatch.chdir(tmp_path / "run")
    cfg = LlavaMiniConfig.from_file(ck / "config.json")
    assert find_vision_tower(ck, cfg, None) == ck / "clip-vision"
    px = frames(2, seed=3)
    m, own, there = (LlavaMini.from_pretrained(ck, vision_tower=v)
                     for v in (None, ck / "clip-vision", tmp_path / "run" / "clip-vision"))
    assert torch.equal(m.encode_frames(px).tokens, own.encode_frames(px).tokens)
    assert not torch.equal(m.encode_frames(px).tokens, there.encode_frames(px).tokens)
    shutil.rmtree(ck / "clip-vision")                       # none in the checkpoint: the one where it runs
    assert find_vision_tower(ck, cfg, None).resolve() == (tmp_path / "run" / "clip-vision").resolve()


def test_vision_tower_not_found(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    shutil.rmtree(ck / "clip-vision")
    with pytest.raises(CheckpointError, match="mm_vision_tower"):
        LlavaMini.from_pretrained(ck)
    with pytest.raises(CheckpointError, match="no folder at"):
        LlavaMini.from_pretrained(ck, vision_tower=tmp_path / "nowhere")


def test_official_variations_load_and_stay_exact(tmp_path):
    """Config without compressor_size/prefusion_layer_num, no pos_embed key, an image_newline key,
    a vision tower saved as a full CLIPModel (like openai/clip-vit-large-patch14-336)."""
    from transformers import CLIPConfig, CLIPModel
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=6)
    cfg = json.loads((ck / "config.json").read_text())
    for k in ("compressor_size", "prefusion_layer_num"):
        cfg.pop(k)
    cfg["mm_vision_tower"] = "/nonexistent/openai/clip-vit-large-patch14-336"
    (ck / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(ck / "model.safetensors"))
    sd.pop("model.compressor.pos_embed")
    sd["model.image_newline"] = torch.zeros(64)
    save_file(sd, str(ck / "model.safetensors"))
    # the tower as a full CLIP folder holding the same vision weights
    vis = load_file(str(ck / "clip-vision" / "model.safetensors"))
    vcfg = json.loads((ck / "clip-vision" / "config.json").read_text())
    full = CLIPModel(CLIPConfig(vision_config={k: vcfg[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")},
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=1000), projection_dim=16))
    missing, _ = full.vision_model.load_state_dict({k.removeprefix("vision_model."): v for k, v in vis.items()},
                                                   strict=False)
    assert not missing
    full.save_pretrained(tmp_path / "clip-full")
    m = LlavaMini.from_pretrained(ck, vision_tower=tmp_path / "clip-full", dtype=torch.float32)
    assert m.cfg.compressor_size == 1 and m.cfg.prefusion_layer_num == 4
    o = OracleLlavaMini.from_pretrained(ck, vision_tower=ck / "clip-vision", dtype=torch.float32)
    ids = m.prompt_ids("what is in the video ?")
    px = frames(2, seed=8)
    assert_close(m.video_logits(ids, m.encode_frames(px)), o(ids, px[None, :, None]), atol=1e-4,
                 what="official variations")


def test_clip_folder_with_a_missing_weight_is_refused(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    f = ck / "clip-vision" / "model.safetensors"
    vis = load_file(str(f))
    vis.pop(next(k for k in vis if "layers.0.mlp.fc1.weight" in k))
    save_file(vis, str(f))
    with pytest.raises(CheckpointError, match="missing or mis-shaped.*layers.0.mlp.fc1.weight"):
        LlavaMini.from_pretrained(ck)


def test_broken_tokenizer_only_fails_asking_in_words(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    (ck / "tokenizer.json").write_text("{ not json")
    m = LlavaMini.from_pretrained(ck)                      # logits and generate need no tokenizer
    ids = torch.tensor([[1, 5, -200, 7, 9]])
    assert m.generate(ids, m.encode_frames(frames(1)), max_new_tokens=2).shape[0] == 1
    with pytest.raises(CheckpointError, match="tokenizer"):
        m.ask(m.encode_frames(frames(1)), "what is in the video ?")


def test_tokenizer_whose_chat_template_fails_still_encodes(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    tc = json.loads((ck / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ raise_exception('no chat here') }}"
    (ck / "tokenizer_config.json").write_text(json.dumps(tc))
    m = LlavaMini.from_pretrained(ck)
    o = OracleLlavaMini.from_pretrained(ck)
    with pytest.warns(UserWarning, match="without a fused prefix"):
        states = m.encode_frames(frames(2))
    assert states.prefix_ids == ()
    ids = torch.tensor([[1, 30, 31, -200, 32, 0, 33]])
    assert_close(m.video_logits(ids, states), o(ids, frames(2)[None, :, None]), atol=1e-4, what="no prefix")
