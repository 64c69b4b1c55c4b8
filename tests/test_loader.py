"""The loader reads the official layout strictly and names what is wrong."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_close, frames
from lmstream.errors import CheckpointError
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
                        ({"compressor_size": None}, "compressor_size")]:
        bad = dict(cfg, **change)
        bad = {k: v for k, v in bad.items() if v is not None}
        (ck / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=msg):
            LlavaMini.from_pretrained(ck)


def test_vision_tower_not_found(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=2)
    shutil.rmtree(ck / "clip-vision")
    with pytest.raises(CheckpointError, match="mm_vision_tower"):
        LlavaMini.from_pretrained(ck)
    with pytest.raises(CheckpointError, match="no folder at"):
        LlavaMini.from_pretrained(ck, vision_tower=tmp_path / "nowhere")
