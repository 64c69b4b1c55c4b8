"""`lmstream` as a user runs it: real files, a real subprocess, one clear line per bad input."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_stream import _damage, write_audio, write_garbage_mp4, write_video

REPO = Path(__file__).resolve().parents[1]


def run(*args, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    e.pop("LMSTREAM_DEBUG", None)
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([sys.executable, "-m", "lmstream.cli", *argv], capture_output=True,
                          text=True, env=e, cwd=REPO, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, code: str, *fragments: str):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error[")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error[{code}]: expected"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(p)
    return p


def test_ask_answers_with_frames_span_and_timings(tiny_ckpt, video):
    r = run("ask", video, "what is in the video ?", "--model", tiny_ckpt, "--json", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["frames"] == 6 and d["frames_fused"] == 6 and d["policy"] == "exact"
    assert d["time_span"] == [0.0, 5.0]
    assert {"decode_s", "encode_s", "fuse_s", "prefill_s", "generate_s", "load_s"} <= set(d["timings"])
    assert 1 <= len(d["token_ids"]) <= 4


def test_ask_matches_the_engine_on_the_same_frames(tiny_ckpt, tiny_model, video):
    """The CLI's answer equals generate() over the same decoded, preprocessed frames."""
    import torch
    from stream.decode import VideoSource
    from stream.preprocess import preprocess_video_frames
    frames = [f.rgb for f in VideoSource(video, fps=0.5)]
    px = preprocess_video_frames(np.stack(frames), **tiny_model.preprocess)
    ids = tiny_model.prompt_ids("how many objects are there ?")
    want = tiny_model.generate(ids, tiny_model.encode_frames(px), max_new_tokens=5)[0].tolist()
    r = run("ask", video, "how many objects are there ?", "--model", tiny_ckpt, "--json", "--fps", "0.5",
            "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want
    assert json.loads(r.stdout)["frames"] == len(frames) == 3


def test_choices_are_scored_by_the_engine(tiny_ckpt, tiny_model, video):
    """`--choice` (repeated): the answer is the likeliest candidate, with the engine's log-probabilities."""
    from stream.decode import VideoSource
    from stream.preprocess import preprocess_video_frames
    frames = [f.rgb for f in VideoSource(video, fps=0.5)]
    states = tiny_model.encode_frames(preprocess_video_frames(np.stack(frames), **tiny_model.preprocess))
    q, choices = "what colour is the circle ?", ["red", "blue circle", "green"]
    want = tiny_model.score_choices(tiny_model.prompt_ids(q), states, choices)
    args = [a for c in choices for a in ("--choice", c)]
    r = run("ask", video, q, "--model", tiny_ckpt, "--json", "--fps", "0.5", *args)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [c["logprob"] for c in d["choices"]] == pytest.approx(want, abs=1e-3)
    assert d["text"] == choices[max(range(3), key=want.__getitem__)]
    r = run("ask", video, q, "--model", tiny_ckpt, "--fps", "0.5", *args)
    assert r.returncode == 0 and "choices (log-probability" in r.stdout and "'blue circle'" in r.stdout


def test_window_and_budget_policy_are_reported(tiny_ckpt, video):
    r = run("ask", video, "what is in the video ?", "--model", tiny_ckpt, "--json", "--window", "1:5",
            "--policy", "budget:2", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["time_span"] == [1.0, 4.0] and d["frames"] == 4          # [1, 5) half-open
    assert d["frames_fused"] == 2 and d["policy"].startswith("budget:2")
    # options between the video and the question (argparse refused the question as "unrecognized")
    r2 = run("ask", video, "--window", "1:5", "--json", "what is in the video ?", "--model", tiny_ckpt,
             "--policy", "budget:2", "--max-new-tokens", "2")
    assert r2.returncode == 0 and json.loads(r2.stdout)["text"] == d["text"], r2.stderr
    assert_one_line_error(run("ask", video, "--window", "1:5", "q", "more", "--model", tiny_ckpt),
                          "E_BAD_ARGUMENT", "unrecognized arguments: q more")


def test_image_instead_of_video_is_one_frame(tiny_ckpt, tmp_path):
    p = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(p)
    r = run("ask", p, "what is in the video ?", "--model", tiny_ckpt, "--json", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["frames"] == 1


def test_missing_file(tiny_ckpt, tmp_path):
    assert_one_line_error(run("ask", tmp_path / "nope.mp4", "q", "--model", tiny_ckpt),
                          "E_INPUT_NOT_FOUND", "nope.mp4")


def test_not_a_video(tiny_ckpt, tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("hello, I am a text file\n" * 20)
    assert_one_line_error(run("ask", p, "q", "--model", tiny_ckpt), "E_NOT_A_VIDEO", "notes.mp4")


def test_no_video_stream(tiny_ckpt, tmp_path):
    p = tmp_path / "tone.wav"
    write_audio(p)
    assert_one_line_error(run("ask", p, "q", "--model", tiny_ckpt), "E_NO_VIDEO_STREAM", "tone.wav")


def test_zero_decodable_frames(tiny_ckpt, tmp_path):
    p = write_garbage_mp4(tmp_path / "garbage.mp4")
    assert_one_line_error(run("ask", p, "q", "--model", tiny_ckpt), "E_NO_FRAMES", "got 0")


def test_corruption_in_the_middle_answers_and_reports_the_gap(tiny_ckpt, tmp_path):
    p = tmp_path / "damaged.ts"
    write_video(p, codec="libx264", fmt="mpegts", gop=25, noise=True)
    _damage(p)
    r = run("ask", p, "what is in the video ?", "--model", tiny_ckpt, "--json", "--fps", "0",
            "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "warning[W_DECODE_GAP]" in r.stderr and "Traceback" not in r.stderr
    d = json.loads(r.stdout)
    assert d["decode_report"]["gaps"] and d["frames"] > 10
    # the warning gives the decoder's reasons (it said "(0 packets failed)" for lost TS packets)
    line, = [x for x in r.stderr.splitlines() if x.startswith("warning[")]
    assert d["decode_report"]["errors"][0] in line and "packets failed" not in line, line


def test_a_reader_that_leaves_early_ends_the_command_quietly(tiny_ckpt, video):
    """`lmstream ask ... --json | head -1`: the answer is written after the reader left. That was
    `error[E_INTERNAL]: BrokenPipeError` with exit 1; it now ends quietly with 141, as a shell says of a
    command a broken pipe stopped."""
    e = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "lmstream.cli", "ask", str(video), "q", "--model", str(tiny_ckpt),
                          "--json", "--max-new-tokens", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=e, cwd=REPO)
    p.stdout.close()                                      # the reader is gone before anything is written
    err = p.communicate(timeout=300)[1].decode()
    assert p.returncode == 141 and "error[" not in err and "Traceback" not in err, (p.returncode, err)


def test_unknown_checkpoint_layout(tmp_path, video):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert_one_line_error(run("ask", video, "q", "--model", ck), "E_CHECKPOINT", "llava_mini_llama", "'llama'")
    (ck / "config.json").unlink()
    (ck / "pytorch_model.bin").write_bytes(b"x")
    assert_one_line_error(run("ask", video, "q", "--model", ck), "E_CHECKPOINT", "config.json")


def test_vision_tower_of_the_wrong_width(tiny_ckpt, tmp_path, video):
    from model.tiny import make_clip
    wrong = make_clip(tmp_path / "clip32", hidden=32)
    assert_one_line_error(run("ask", video, "q", "--model", tiny_ckpt, "--vision-tower", wrong),
                          "E_CHECKPOINT", "width 64", "got width 32")


def test_question_longer_than_the_context(tmp_path, video):
    from model.tiny import make_tiny_checkpoint
    ck = make_tiny_checkpoint(tmp_path / "short", max_pos=96)
    long_q = " ".join(["what colour is the circle ?"] * 20)
    assert_one_line_error(run("ask", video, long_q, "--model", ck), "E_CONTEXT_TOO_LONG", "at most 96")
    # frames that cannot fit are refused before the video is decoded (18,000 frames took 67 s of ingest to
    # say so), from its declared duration: 20 s at 10 fps here
    import av
    import numpy as np
    path = tmp_path / "ten_fps.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(200):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i, np.uint8), format="rgb24")))
        c.mux(s.encode())
    r = run("ask", path, "q", "--model", ck, "--fps", "10")
    assert_one_line_error(r, "E_CONTEXT_TOO_LONG", "at most 96", "from about 196 frames at 10 fps over 20 s",
                          "lower --fps or ask about a --window")
    assert "ingest" not in r.stderr                     # refused before any frame was decoded
    assert run("ask", path, "q", "--model", ck, "--fps", "1", "--max-new-tokens", "1").returncode == 0


def test_bad_window_argument(tiny_ckpt, video):
    for window, says in (("9:3", "START < END, got '9:3'"), ("-5:10", "START >= 0 s"), ("2:-1", "END >= 0 s"),
                         ("nan:5", "two numbers of seconds"), ("a:b", "two numbers"), ("10", "two numbers")):
        assert_one_line_error(run("ask", video, "q", "--model", tiny_ckpt, f"--window={window}"),
                              "E_BAD_ARGUMENT", says)


def test_eval_demo_and_bench_refuse_bad_options_before_any_work(tmp_path):
    """Each was an empty table with exit 0, or E_INTERNAL after the whole evaluation (--out a folder)."""
    for args, says in ((["--out", tmp_path], "a file path for the JSON, got the folder"),
                       (["--out", tmp_path / "no" / "x.json"], "an existing folder you can write"),
                       (["--videos", "0"], "--videos of at least 1"), (["--videos", "60s=abc"], "whole numbers"),
                       (["--tiers", ","], "--tiers among"), (["--tiers", "60s", "--videos", "10min=2"], "tiers that run"),
                       (["--max-new-tokens", "0"], "--max-new-tokens >= 1"), (["--batch-size", "0"], "--batch-size >= 1"),
                       (["--needle-trials", "-1"], "--needle-trials >= 0"), (["--policies", "bogus"], "fusion policy"),
                       (["--threads", "-1"], "--threads >= 1")):
        assert_one_line_error(run("eval-demo", *args), "E_BAD_ARGUMENT", says)
    for args, says in ((["flops", "--frames", "-5"], "frame counts"), (["memory", "--frames", "abc"], "frame counts"),
                       (["flops", "--budget", "0"], "a whole number >= 1"),
                       (["flops", "--out", tmp_path], "a file path for the JSON, got the folder"),   # was E_INTERNAL
                       (["memory", "--out", tmp_path], "a file path for the JSON, got the folder"),  # after the work
                       # each ran the whole benchmark and exited 0 (headroom "-20.68 ... NO", "+nan")
                       (["memory", "--cap-gb", "-1"], "--cap-gb: expected a number > 0, got '-1'"),
                       (["memory", "--cap-gb", "nan"], "--cap-gb: expected a number > 0, got 'nan'"),
                       (["memory", "--host-gb", "0"], "--host-gb: expected a number > 0")):
        assert_one_line_error(run("bench", *args), "E_BAD_ARGUMENT", says)
    assert not list(tmp_path.parent.glob(tmp_path.name + ".tmp"))       # and left DIR.tmp behind
    import argparse
    from benchmarks.cli import cpu_arguments, gpu_arguments
    for add, opt in ((cpu_arguments, "--threads"), (gpu_arguments, "--eager-batch")):   # 0 is their documented
        p = argparse.ArgumentParser(exit_on_error=False)                                 # "torch's default" / "skip"
        add(p)
        assert getattr(p.parse_args([opt, "0"]), opt[2:].replace("-", "_")) == 0
        with pytest.raises(argparse.ArgumentError, match="a whole number >= 0"):
            p.parse_args([opt, "-1"])
    p = argparse.ArgumentParser(exit_on_error=False)
    gpu_arguments(p)
    assert p.parse_args(["--cap-gb", "0"]).cap_gb == 0                   # 0: no cap, as its help says
    with pytest.raises(argparse.ArgumentError, match="a number >= 0"):
        p.parse_args(["--cap-gb", "-2"])


def test_make_tiny_never_writes_over_files_and_commands_are_named(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"mine")
    assert_one_line_error(run("make-tiny", ck), "E_BAD_ARGUMENT", "new or empty folder", "holds files")
    assert (ck / "model.safetensors").read_bytes() == b"mine"
    assert_one_line_error(run("make-tiny", ""), "E_BAD_ARGUMENT", "an empty name")
    assert_one_line_error(run("make-tiny", "/proc/x"), "E_BAD_ARGUMENT", "can be written", "/proc/x")
    r = run("make-tiny", ck, "--force")
    assert r.returncode == 0 and (ck / "config.json").exists(), r.stderr
    r = run()
    assert_one_line_error(r, "E_BAD_ARGUMENT", "no command (one of: ask, demo", "serve", "eval-demo")
    assert r.stderr.count("\n") == 1 and "usage:" not in r.stderr      # one line, --help for the rest


def test_demo_main_job_runs_end_to_end(tmp_path):
    r = run("demo", "--duration", "12", "--seed", "3", env={"LMSTREAM_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "ingest: 12 frames" in r.stdout and "correct" in r.stdout


# Arguments are checked before the model loads: with a model path that does not exist, a bad
# argument must still be reported as itself (E_CHECKPOINT would mean the load came first).
@pytest.mark.parametrize("extra,code,fragment", [
    (["--batch-size", "0"], "E_BAD_ARGUMENT", "--batch-size >= 1"),
    (["--batch-size", "-1"], "E_BAD_ARGUMENT", "got -1"),
    (["--max-new-tokens", "0"], "E_BAD_ARGUMENT", "--max-new-tokens >= 1"),
    (["--max-new-tokens", "-5"], "E_BAD_ARGUMENT", "got -5"),
    (["--dtype", "foo"], "E_BAD_ARGUMENT", "'foo'"),
    (["--device", "cuda"], "E_DEVICE_UNAVAILABLE", "expected a CUDA GPU"),
    (["--device", "tpu"], "E_BAD_ARGUMENT", "cpu or cuda"),
    (["--fps", "100000"], "E_BAD_ARGUMENT", "--fps in (0, 1000]"),
    (["--fps", "-1"], "E_BAD_ARGUMENT", "--fps"),
    (["--fps", "nan"], "E_BAD_ARGUMENT", "--fps"),
    (["--policy", "budget:0"], "E_BAD_ARGUMENT", "budget:N"),
    (["--choice", "red"], "E_BAD_ARGUMENT", "--choice 2 to 64 times"),
    ([a for i in range(65) for a in ("--choice", f"c{i}")], "E_BAD_ARGUMENT", "--choice 2 to 64 times, got 65"),
    (["--choice", "red", "--choice", " "], "E_BAD_ARGUMENT", "blank choice number 2"),
    (["--window", "5:"], None, None),
])
def test_arguments_are_checked_before_the_model_loads(tmp_path, video, extra, code, fragment):
    r = run("ask", video, "what is in the video ?", "--model", tmp_path / "no-such-model", *extra)
    if code is None:                                  # a valid argument: now the missing model is reported
        assert_one_line_error(r, "E_CHECKPOINT", "no-such-model")
    else:
        assert_one_line_error(r, code, fragment)


def test_bad_arguments_are_answered_without_loading_torch(tmp_path, video):
    """A usage mistake is one line at once: torch (2-4 s to import) is not loaded to say it."""
    script = ("import json, sys; from lmstream.cli import main; rc = main(json.loads(sys.argv[1])); "
              "print(json.dumps([rc, 'torch' in sys.modules]))")
    for argv, code in ((["eval-demo", "--videos", "0"], "E_BAD_ARGUMENT"),
                       (["eval-demo", "--policies", "budget:0"], "E_BAD_ARGUMENT"),
                       (["ask", str(video), "q", "--policy", "budget:0"], "E_BAD_ARGUMENT"),
                       (["ask", str(video), "q", "--model", str(tmp_path / "none")], "E_CHECKPOINT"),
                       (["make-tiny", ""], "E_BAD_ARGUMENT")):
        r = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], capture_output=True, text=True,
                           cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
        rc, torch_loaded = json.loads(r.stdout.strip().splitlines()[-1])
        assert rc != 0 and f"error[{code}]" in r.stderr, (argv, r.stderr)
        assert not torch_loaded, (argv, "torch was imported to report a bad argument")


def test_unknown_options_point_to_their_commands_help_and_bad_service_settings_name_their_variable(tmp_path):
    """An unknown option is reported by the root parser, which pointed at `lmstream --help` whatever the
    command; it now names the command's own help. A bad LMSTREAM_* variable was E_INTERNAL (a pydantic
    ValidationError, a JSONDecodeError, a ValueError) and a misspelt limit was ignored: each is now one
    E_BAD_ARGUMENT line naming the variable, at once, exit status 2."""
    for argv, prog, bad in ((["bench", "flops", "--bogus"], "lmstream bench flops", "--bogus"),
                            (["ask", "--bogus", "v.mp4", "q"], "lmstream ask", "--bogus"),
                            (["cache", "ls", "--cache", "x", "--zzz"], "lmstream cache", "--zzz")):
        assert_one_line_error(run(*argv), "E_BAD_ARGUMENT", f"`{prog}` (see `{prog} --help`)", bad)
    from frame_cache.redis_server import free_port
    for env, says in (({"LMSTREAM_LIMITS": '{"max_upload_bytes": -5}'},
                       "expected LMSTREAM_LIMITS (limits.max_upload_bytes) to be valid: Input should be greater "
                       "than or equal to 1, got -5"),
                      ({"LMSTREAM_LIMITS": "notjson"}, "expected LMSTREAM_LIMITS to be a JSON object"),
                      ({"LMSTREAM_LIMITS": '{"max_uplod_bytes": 5}'}, "known limits (max_upload_bytes, "),
                      ({"LMSTREAM_WARM_DECODERS": "abc"}, "expected LMSTREAM_WARM_DECODERS to be an integer, "
                                                          "got 'abc'"),
                      # these were read as no (and as no key: one generated), silently
                      ({"LMSTREAM_ALLOW_PRIVATE_SOURCES": "maybe"}, "expected LMSTREAM_ALLOW_PRIVATE_SOURCES to "
                                                                    "be 1, true, yes, on or 0, false, no, off"),
                      ({"LMSTREAM_API_KEYS": " , "}, "expected LMSTREAM_API_KEYS to be comma-separated keys, got "
                                                     "' , ' (no key in it)"),
                      ({"LMSTREAM_ALLOWED_DIRS": "/no/such/dir"}, "expected LMSTREAM_ALLOWED_DIRS to be an "
                                                                  "existing folder, got /no/such/dir")):
        r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", env=env)
        assert_one_line_error(r, "E_BAD_ARGUMENT", says)
        assert r.returncode == 2 and not (tmp_path / "d").exists(), r.stderr
    (tmp_path / "afile").write_text("x")                # a data folder that is a file: was E_INTERNAL
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "afile")
    assert_one_line_error(r, "E_BAD_ARGUMENT", f"expected --data-dir to be a folder it can create and write, got "
                                               f"{tmp_path / 'afile'} (File exists)")


def test_serve_refuses_a_cut_short_checkpoint_before_ray_starts(tmp_path, tiny_ckpt):
    """A weight file cut short (`truncate -s 100000 model.safetensors`) was "error[E_INTERNAL]: RuntimeError:
    Deploying application lmstream failed" after a minute, the real reason only in a Ray log. Its header is
    now read before Ray starts (no torch in the driver): E_CHECKPOINT naming the file, exit status 4."""
    import shutil
    from lmcore.errors import CheckpointError
    from lmcore.weights import check_weight_files
    from frame_cache.redis_server import free_port
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    check_weight_files(ck)                                  # whole: passes
    w = ck / "model.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=f"tensors ending at byte {size}, in a file of {size - 1000} bytes"):
        check_weight_files(ck)
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", "--model", ck)
    assert_one_line_error(r, "E_CHECKPOINT", f"expected a readable safetensors file at {w}")
    assert r.returncode == 4 and "ray:" not in r.stderr, r.stderr
    w.write_bytes(b"\xff" * 64)                             # not a safetensors file at all
    with pytest.raises(CheckpointError, match="a header of"):
        check_weight_files(ck)


def test_bad_inputs_are_reported_before_the_model_loads(tmp_path):
    assert_one_line_error(run("ask", tmp_path / "nope.mp4", "q", "--model", tmp_path / "none"),
                          "E_INPUT_NOT_FOUND", "nope.mp4")
    (tmp_path / "t.mp4").write_text("text" * 100)
    assert_one_line_error(run("ask", tmp_path / "t.mp4", "q", "--model", tmp_path / "none"), "E_NOT_A_VIDEO")


def test_question_that_is_not_utf8(tiny_ckpt, video):
    r = run("ask", video, b"what \xff\xfe is it", "--model", tiny_ckpt)
    assert_one_line_error(r, "E_BAD_ARGUMENT", "UTF-8", "\\xff")


def test_stream_without_cache_and_nothing_to_ask_about(tiny_ckpt):
    assert_one_line_error(run("ask", "--stream", "s1", "q", "--model", tiny_ckpt), "E_BAD_ARGUMENT", "--cache")


def test_ask_through_redis_then_again_by_stream_id(tiny_ckpt, video, redis_server):
    url = redis_server.url
    r = run("ask", video, "what is in the video ?", "--model", tiny_ckpt, "--json", "--max-new-tokens", "4",
            "--cache", url)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    sid = first["stream_id"]
    assert sid.startswith("file-clip-") and first["cache"] == url and "encode_s" in first["timings"]
    r = run("ask", "--stream", sid, "what is in the video ?", "--model", tiny_ckpt, "--json", "--max-new-tokens",
            "4", "--cache", url)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["token_ids"] == first["token_ids"] and again["frames"] == first["frames"] == 6
    assert "encode_s" not in again["timings"]                   # nothing re-encoded
    r = run("ask", "--stream", sid, "q", "--model", tiny_ckpt, "--json", "--cache", url, "--window", "2:4")
    assert json.loads(r.stdout)["time_span"] == [2.0, 3.0]
    r = run("ask", video, "q", "--model", tiny_ckpt, "--cache", url, "--stream", sid)
    assert_one_line_error(r, "E_STREAM_EXISTS", sid)
    r = run("cache", "ls", "--cache", url, "--json")
    assert sid in [d["stream_id"] for d in json.loads(r.stdout)]
    assert run("cache", "rm", sid, "--cache", url).returncode == 0
    assert_one_line_error(run("ask", "--stream", sid, "q", "--model", tiny_ckpt, "--cache", url),
                          "E_STREAM_NOT_FOUND", sid)
    # options that only encode, given when nothing is encoded, were ignored without a word
    assert_one_line_error(run("ask", "--stream", sid, "q", "--fps", "2", "--kv=fp8", "--cache", url, "--model",
                              tiny_ckpt), "E_BAD_ARGUMENT", "expected --fps, --kv only with a VIDEO to encode")
    # the question left out: the video was taken for the question about the stored frames
    assert_one_line_error(run("ask", video, "--stream", sid, "--model", tiny_ckpt, "--cache", url),
                          "E_BAD_ARGUMENT", "expected a question after the video, got none")
    # an ingest that stored nothing leaves no empty stream behind: a retry under the same id works (it was
    # E_STREAM_EXISTS, and asking said the stream had no frame)
    assert_one_line_error(run("ask", video, "q", "--model", tiny_ckpt, "--cache", url, "--stream", "w1", "--window",
                              "50:60"), "E_NO_FRAMES")
    assert "w1" not in run("cache", "ls", "--cache", url).stdout
    r = run("ask", video, "q", "--model", tiny_ckpt, "--cache", url, "--stream", "w1", "--window", "2:4",
            "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    r = run("cache", "rm", "w1", "--cache", url, "--json")           # --json was plain text here
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] is True and json.loads(r.stdout)["stream_id"] == "w1"
    assert_one_line_error(run("cache", "ls", "extra", "--cache", url), "E_BAD_ARGUMENT", "no stream id with ls")


def test_unreachable_redis_is_a_clear_error(tiny_ckpt, video):
    from frame_cache.redis_server import free_port
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for argv in (("ask", video, "q", "--model", tiny_ckpt, "--cache", dead), ("cache", "ls", "--cache", dead)):
        r = run(*argv)
        # it said "for listing streams", the first thing ask happened to do, which no user asked for
        assert_one_line_error(r, "E_CACHE_UNAVAILABLE", f"expected a reachable Redis at {dead} for this "
                              "command's --cache, got ConnectionError")
        assert r.returncode == 6


def test_usage_errors_are_one_line_with_a_code(tiny_ckpt, video, tmp_path):
    r = run("ask", video, "q", "--kv", "fp9", "--model", tiny_ckpt)
    assert_one_line_error(r, "E_BAD_ARGUMENT", "fp9")
    assert_one_line_error(run("ask", video, "--model", tiny_ckpt), "E_BAD_ARGUMENT", "a question")
    assert_one_line_error(run("ask", video, "q", "--stream", "bad id!"), "E_BAD_ARGUMENT", "stream id")
    assert_one_line_error(run("ask", video, "q", "--cache", "redis://localhost:notaport/0"), "E_BAD_ARGUMENT",
                          "notaport")
    # an option redis-py has no name for was E_INTERNAL (a TypeError), a DB that is no number was taken as 0
    assert_one_line_error(run("cache", "ls", "--cache", "redis://127.0.0.1:1/0?foo=bar"), "E_BAD_ARGUMENT",
                          "unexpected keyword argument 'foo'")
    assert_one_line_error(run("cache", "ls", "--cache", "redis://127.0.0.1:1/abc"), "E_BAD_ARGUMENT",
                          "with DB a number")
    (tmp_path / "notes.txt").write_text("hello\n" * 50)
    assert_one_line_error(run("ask", tmp_path / "notes.txt", "q", "--model", tiny_ckpt), "E_NOT_A_VIDEO")


def test_serve_refuses_a_busy_port_and_rays_agent_port_before_starting_anything(tmp_path):
    """`lmstream serve` checks its HTTP port before it starts Redis or a local Ray: a port that is
    taken, or 52365 (where a local Ray's dashboard agent always listens), is a one-line
    E_BAD_ARGUMENT within seconds, not Serve's proxy failing 30 s later, and nothing is left in the
    data folder's redis/ or ray/."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run("serve", "--port", str(port), "--data-dir", tmp_path / "d")
        assert_one_line_error(r, "E_BAD_ARGUMENT", f"--port {port} to be free on 127.0.0.1")
    assert_one_line_error(run("serve", "--port", "52365", "--data-dir", tmp_path / "d"), "E_BAD_ARGUMENT",
                          "other than 52365", "dashboard agent")
    assert_one_line_error(run("serve", "--host", "203.0.113.9", "--data-dir", tmp_path / "d"), "E_BAD_ARGUMENT",
                          "--host to be an address of this machine", "203.0.113.9")
    assert_one_line_error(run("serve", "--host", "no-such-host.invalid", "--data-dir", tmp_path / "d"),
                          "E_BAD_ARGUMENT", "--host to be an address or name", "no-such-host.invalid")
    if socket.has_ipv6:
        try:
            held6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            held6.bind(("::1", 0))
        except OSError:
            held6 = None                                  # no IPv6 loopback here
        if held6 is not None:
            with held6:
                held6.listen()
                port6 = held6.getsockname()[1]
                assert_one_line_error(run("serve", "--host", "::1", "--port", str(port6), "--data-dir", tmp_path / "d"),
                                      "E_BAD_ARGUMENT", f"--port {port6} to be free on ::1, got it in use")
    assert not (tmp_path / "d" / "redis").exists() and not (tmp_path / "d" / "ray").exists()


def test_serve_stdout_carries_only_its_json_lines():
    """`lmstream serve`'s stdout is its ready line, for `json.loads`: Ray's raylet lines ("(raylet) WARNING:
    8 PYTHON worker processes ...", in ANSI colours) were appended to it, from the driver's C++ side and
    from the processes Ray starts, which inherit fd 1. Once serve keeps a copy of stdout for its own lines,
    whatever writes to fd 1 the way Ray does (Python's print, a C-level write, a child process) lands on
    stderr. (tests/test_service.py's `Service.stop` checks a real service's stdout the same way.)"""
    code = "\n".join([
        "import json, os, subprocess, sys",
        "print('before', flush=True)",                              # ours, before the switch: still stdout
        "from lmstream.serve_cmd import _stdout_for_our_lines",
        "ours = _stdout_for_our_lines()",
        "os.write(1, b'\\x1b[33m(raylet)\\x1b[0m WARNING: 8 PYTHON worker processes\\n')",
        "print('Task ServeController.graceful_shutdown failed')",
        "subprocess.run([sys.executable, '-c', 'print(\"a child of the service\")'], check=True)",
        "print(json.dumps({'url': 'http://127.0.0.1:1'}), file=ours, flush=True)",
    ])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'before\n{"url": "http://127.0.0.1:1"}\n', r.stdout
    assert "(raylet)" in r.stderr and "graceful_shutdown" in r.stderr and "a child of the service" in r.stderr


def test_serve_refuses_an_unreachable_redis_and_a_missing_device_before_starting_anything(tmp_path):
    """A --redis (or LMSTREAM_REDIS_URL) nobody answers on is E_CACHE_UNAVAILABLE (exit 6) before Ray
    starts, not a /ready that times out minutes later; --device cuda on a machine without one is
    E_DEVICE_UNAVAILABLE (exit 2) and a device that is no device E_BAD_ARGUMENT, as `ask` says them."""
    import torch
    from frame_cache.redis_server import free_port
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for args, env in (((["--redis", dead]), None), ([], {"LMSTREAM_REDIS_URL": dead})):
        r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", *args, env=env)
        assert_one_line_error(r, "E_CACHE_UNAVAILABLE", f"reachable Redis at {dead}", "got ConnectionError")
        assert r.returncode == 6
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", "--device", "tpu")
    assert_one_line_error(r, "E_BAD_ARGUMENT", "--device cpu or cuda[:N], got 'tpu'")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gone = "cuda" if n == 0 else f"cuda:{n}"                            # a GPU this machine does not have
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", "--device", gone)
    assert_one_line_error(r, "E_DEVICE_UNAVAILABLE", "expected a CUDA GPU for --device cuda" if n == 0
                          else f"expected --device cuda:0..cuda:{n - 1}, got {gone}")
    assert r.returncode == 2
    assert not (tmp_path / "d" / "redis").exists() and not (tmp_path / "d" / "ray").exists()


def test_serve_redis_maxmemory_reads_sizes_as_redis_does_and_refuses_what_it_cannot_apply(tmp_path, monkeypatch):
    """`lmstream serve`'s own redis-server has a memory cap (it grew until the kernel's OOM killer took it or a
    model replica): --redis-maxmemory, else LMSTREAM_REDIS_MAXMEMORY, else half this machine's memory. Sizes
    read as redis.conf reads them; a size it cannot read, one too small for the job records, or a cap for
    someone else's Redis (--redis) is a one-line E_BAD_ARGUMENT before anything starts."""
    from frame_cache.redis_server import free_port
    from lmcore.errors import BadArgument
    from lmstream.serve_cmd import MIN_REDIS_MAXMEMORY, parse_memory_size, redis_maxmemory
    assert parse_memory_size("8gb", "x") == 8 << 30 and parse_memory_size("500MB", "x") == 500 << 20
    assert parse_memory_size("1g", "x") == 10 ** 9 and parse_memory_size("0", "x") == 0
    assert parse_memory_size("1.5gb", "x") == 3 << 29 and parse_memory_size(str(1 << 30), "x") == 1 << 30
    for bad in ("lots", "8 gigs", "-1gb", ""):
        with pytest.raises(BadArgument, match=f"expected x to be a size such as 8gb, 500mb or 0 \\(none\\), got {bad!r}"):
            parse_memory_size(bad, "x")
    with pytest.raises(BadArgument, match="at least 64mb .* got '1mb' \\(1048576 bytes\\)"):
        parse_memory_size("1mb", "x")
    monkeypatch.delenv("LMSTREAM_REDIS_MAXMEMORY", raising=False)
    n, why = redis_maxmemory(None)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert MIN_REDIS_MAXMEMORY <= n <= total // 2 and why.startswith("half this machine's memory"), (n, why)
    import lmstream.serve_cmd as sc                                  # a container's limit, when lower, is the base
    (tmp_path / "memory.max").write_text(f"{1 << 30}\n")
    monkeypatch.setattr(sc, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "memory.max"),))
    assert redis_maxmemory(None)[0] == 1 << 29
    (tmp_path / "memory.max").write_text("max\n")                   # no limit: the machine's memory
    assert redis_maxmemory(None)[0] == max(MIN_REDIS_MAXMEMORY, total // 2)
    monkeypatch.setenv("LMSTREAM_REDIS_MAXMEMORY", "2gb")
    assert redis_maxmemory(None) == (2 << 30, "LMSTREAM_REDIS_MAXMEMORY")
    assert redis_maxmemory("0") == (0, "--redis-maxmemory")              # the argument wins
    monkeypatch.delenv("LMSTREAM_REDIS_MAXMEMORY")
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", "--redis-maxmemory", "lots")
    assert_one_line_error(r, "E_BAD_ARGUMENT", "expected --redis-maxmemory to be a size such as 8gb", "got 'lots'")
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", "--redis", "redis://127.0.0.1:1/0",
            "--redis-maxmemory", "1gb")
    assert_one_line_error(r, "E_BAD_ARGUMENT", "--redis-maxmemory only for the service's own redis-server",
                          "with --redis too")
    r = run("serve", "--port", free_port(), "--data-dir", tmp_path / "d", env={"LMSTREAM_REDIS_MAXMEMORY": "9x"})
    assert_one_line_error(r, "E_BAD_ARGUMENT", "expected LMSTREAM_REDIS_MAXMEMORY to be a size", "got '9x'")
    assert not (tmp_path / "d" / "redis").exists() and not (tmp_path / "d" / "ray").exists()


@pytest.mark.xdist_group("ray")
@pytest.mark.timeout(300)
def test_serve_stops_in_seconds_when_the_stop_signal_reaches_its_whole_process_group(tmp_path):
    """SIGTERM to `lmstream serve`'s whole process group (`timeout`, `kill -TERM -PGID`, systemd's default
    KillMode) reached Ray's own processes too; the drain then waited on the gone GCS until Ray aborted the
    process after 60 s. Now it says so and stops in seconds, leaving no process of its group. Its own
    redis-server runs with the --redis-maxmemory asked for, said on its start line. pytest's data folder is
    too long a path for Ray's Unix sockets (Ray failed: "AF_UNIX path length cannot exceed 107 bytes", as
    E_INTERNAL): its session goes to a short temporary folder, said, and removed on exit."""
    import signal
    import redis
    from frame_cache.redis_server import free_port
    from lmstream.serve_cmd import start_serve_process
    log = tmp_path / "serve.log"
    data = tmp_path / ("d" * 60)                                     # too long for Ray's sockets, wherever pytest is
    proc, ready = start_serve_process(["--port", free_port(), "--data-dir", data, "--num-cpus", "2",
                                       "--redis-maxmemory", "64mb"], log, new_session=True, timeout=240)
    try:
        r = redis.Redis.from_url(ready["redis"])
        assert r.config_get("maxmemory") == {"maxmemory": str(64 << 20)} and \
            r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        r.close()
        assert "maxmemory 64 MiB (--redis-maxmemory)" in log.read_text(), log.read_text()[-2000:]
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(90)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        proc.stdout.close()
    text = log.read_text()
    assert took < 40, (took, text[-3000:])
    moved = re.search(r"ray: its session in (\S+) \(removed on exit\): .* is too long a path for the Unix "
                      r"sockets", text)
    assert moved and not Path(moved.group(1)).exists(), text[-3000:]
    assert "stopped with this one (a stop signal sent to its whole process group" in text, text[-3000:]
    deadline = time.monotonic() + 30
    while True:                                  # nothing of its group left (Ray's workers end on their own)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, subprocess.run(["ps", "-o", "pid,pgid,cmd", "-g", str(proc.pid)],
                                                           capture_output=True, text=True).stdout
        time.sleep(0.5)


def test_demo_checks_its_duration_and_runs_on_a_model_that_cannot_spell_the_choices(tmp_path):
    """`lmstream demo` on a random tiny checkpoint (what it falls back to without a trained one): its
    tokenizer lacks colour words such as "purple", so those questions' candidates are reported as not
    scored instead of ending the demo; a duration under the shortest scene is refused up front."""
    from model.tiny import make_tiny_checkpoint
    ck = make_tiny_checkpoint(tmp_path / "tiny", seed=0)
    r = run("demo", "--duration", "8", "--model", ck, "--fps", "2")
    assert r.returncode == 0, r.stderr
    assert "ingest: 8 frames" in r.stdout and "(not scored)" in r.stdout
    # the scene is rendered at 1 fps: --fps 2 got 8 frames, not 16, and the line says so (it said "at 2.0 fps")
    assert "sampled at 1 fps (the video's own rate; --fps 2 asked for more)" in r.stdout, r.stdout
    assert "in words this model's tokenizer knows" in r.stdout        # each reason printed once, with its families
    for bad in ("0", "-5", "nan", "inf"):
        assert_one_line_error(run("demo", "--duration", bad, "--model", ck), "E_BAD_ARGUMENT",
                              "--duration of at least 3 s")
    for args, says in ((["--duration", "1e9"], "--duration of at most 14400 s"), (["--seed", "-1"], "--seed >= 0"),
                       (["--out", tmp_path], "a file path for the video, got the folder"),
                       (["--out", "/proc/nope/x.mp4"], "a folder that exists or can be made"),
                       (["--out", tmp_path / "d.webm"], "to end in .mp4 (the demo writes H.264 in MP4)")):
        assert_one_line_error(run("demo", *args, "--model", ck), "E_BAD_ARGUMENT", says)


def test_free_port_stays_out_of_the_kernels_range_and_never_repeats(monkeypatch):
    import frame_cache.redis_server as rs
    lo, hi = rs._port_range()
    eph_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert (lo, hi) == ((20000, eph_low) if eph_low >= 22000 else (0, 0))
    drawn = [rs.free_port() for _ in range(50)]
    buses = [rs.free_port(cluster_bus=True) for _ in range(20)]
    assert len(set(drawn)) == 50 and not set(buses) & set(drawn) and 52365 not in drawn + buses
    if hi:                                            # room below the kernel's range (here): drawn from there
        assert all(lo <= p < hi for p in drawn)
        assert all(lo <= p and p + 10000 < hi for p in buses)
    busy = 23001
    offered = iter([52365, busy, 24001, 24001, 24002, 25000])  # Ray's fixed port, a taken one, one twice
    monkeypatch.setattr(rs, "_candidate_port", lambda span=0: next(offered))
    monkeypatch.setattr(rs, "_port_free", lambda p: p != busy)
    monkeypatch.setattr(rs, "_handed_out", set())
    rs.reserve_port(24002)                                    # as `lmstream serve` reserves its --port
    assert [rs.free_port(), rs.free_port()] == [24001, 25000]


@pytest.mark.parametrize("family,address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                                            (socket.AF_INET6, "::")])
def test_port_free_sees_a_port_held_on_ipv4_or_ipv6_alone(family, address):
    """A server listening only on IPv6 (::1, or [::] with IPV6_V6ONLY) holds its port too: the IPv4
    bind alone finds it free, and free_port would hand it out."""
    import frame_cache.redis_server as rs
    try:
        held = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        pytest.skip("no IPv6 socket on this machine")
    with held:
        if family == socket.AF_INET6:
            held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            held.bind((address, rs.free_port()))        # outside the ephemeral range: port 0 gave one that an
        except OSError:                                 # outgoing connection could take before the last check
            pytest.skip(f"cannot bind {address} here")
        held.listen()
        port = held.getsockname()[1]
        assert rs._port_free(port) is False
    assert rs._port_free(port) is True                   # released: free again on both


def test_serve_prints_a_url_clients_can_use_for_an_ipv6_host():
    """`lmstream serve --host ::1` printed `http://::1:8000`, which curl and httpx refuse as malformed."""
    import httpx
    from lmstream.serve_cmd import service_url
    assert service_url("::1", 8000) == "http://[::1]:8000" and service_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    assert httpx.URL(service_url("::1", 8000)).host == "::1" and httpx.URL(service_url("::", 1)).port == 1


def test_serve_takes_its_redis_port_of_last_time_when_it_is_free(tmp_path):
    """`lmstream serve`'s own redis-server had a new port at each start on the same data folder, so a
    `lmstream cache ... --cache redis://...` line or a dashboard broke with every restart."""
    import socket
    from frame_cache.redis_server import free_port
    from lmstream.serve_cmd import _last_redis_port
    assert _last_redis_port(tmp_path) is None                        # first start: none kept
    port = free_port()
    (tmp_path / "port").write_text(f"{port}\n")
    assert _last_redis_port(tmp_path) == port
    assert _last_redis_port(tmp_path, avoid=port) is None           # the HTTP port asked for: not Redis's
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        assert _last_redis_port(tmp_path) is None                    # taken meanwhile: a new one
    for bad in ("x", "52365", "80"):
        (tmp_path / "port").write_text(bad)
        assert _last_redis_port(tmp_path) is None


def test_the_image_kuberay_runs_is_built_from_what_the_project_pins():
    """deploy/Dockerfile is not built here (no Docker engine): its pins must still be the project's. The image
    tag kuberay.yaml runs is the package's version, its Ray the one kuberay.yaml declares, its torch the one
    scripts/setup.sh installs, and it copies every package pyproject.toml ships."""
    import re
    import tomllib
    root = Path(__file__).resolve().parent.parent
    docker = (root / "deploy" / "Dockerfile").read_text()
    kube = (root / "deploy" / "kuberay.yaml").read_text()
    proj = tomllib.loads((root / "pyproject.toml").read_text())
    version = proj["project"]["version"]
    assert set(re.findall(r"image: lmstream:(\S+)", kube)) == {version}
    assert f"lmstream:{version}" in docker
    ray = re.search(r'rayVersion: "([^"]+)"', kube).group(1)
    assert re.search(rf"ARG RAY_VERSION={re.escape(ray)}\n", docker)
    torch_pin = re.search(r'torch==([0-9.]+)\+cpu', (root / "scripts" / "setup.sh").read_text()).group(1)
    assert f'"torch=={torch_pin}"' in docker
    packages = {p.rstrip("*") for p in proj["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages == set(re.findall(r"^COPY (\w+) \1$", docker, re.M))
    assert "app_builder" in kube and (root / "deploy" / "app.py").read_text().count("def app_builder") == 1
