"""`make tokenizer` -> `make data` -> training, on a corpus in FineWeb-Edu's shape.

The fast tests run the data job in this process (`--workers 0`, the same bytes as Ray Data)
on local files; the slow ones run the make targets against a real S3-protocol server on
127.0.0.1 (tests/s3server.py), kill `make data` halfway, resume it, compare its shards byte for
byte with an uninterrupted run's, and train a few steps on 2 workers reading them from the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_data import REPO, fixture_module_cache, speeches  # noqa: F401

from data_pipeline import load_tokenizer, train_tokenizer
from data_pipeline.datajob import check_tokenized, plan_tasks, run_job, task_records
from data_pipeline.spec import DataSpec
from data_pipeline.synthetic import COLUMNS, paragraphs, write_fineweb_like

ROWS_PER_SHARD = 16  # 4 row groups of 4 rows: 3 shards per file


def corpus_docs() -> list[str]:
    s = speeches()
    return paragraphs(["\n\n".join(s), "\n\n".join(reversed(s))], 1200)


def spec_dict(root: str) -> dict:
    return {"name": "fineweb-edu-test", "val_fraction": 0.12,
            "sources": [{"path": f"{root}/sample/10BT/*.parquet", "name": "fineweb-edu"}]}


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory, module_cache):
    root = tmp_path_factory.mktemp("fineweb")
    written = write_fineweb_like(str(root), corpus_docs(), files=4, rows_per_group=4)
    spec = DataSpec.from_dict(spec_dict(str(root)))
    tok = train_tokenizer(corpus_docs(), 512)
    tok.save(str(root / "tok"))
    tok = load_tokenizer(str(root / "tok"))
    return root, spec, tok, written


def test_fineweb_shape_and_broken_records_are_counted_by_reason(local_corpus):
    import pyarrow.parquet as pq

    root, spec, _, written = local_corpus
    files = written["files"]
    assert tuple(pq.read_schema(files[0]).names) == COLUMNS
    assert pq.ParquetFile(files[0]).metadata.num_row_groups > 1
    tasks = plan_tasks(spec, ROWS_PER_SHARD)
    train = [t for t in tasks if t["split"] == "train"]
    groups = pq.ParquetFile(files[0]).metadata.num_row_groups
    assert len(train) == 4 * -(-groups // 4)  # whole row groups, 4 to a shard
    assert [len(t["row_groups"]) for t in train[:-1]].count(4) >= len(train) - 4
    skipped: dict[str, int] = {}
    good = 0
    for t in tasks:
        for rec in task_records(t):
            if rec["skip"]:
                skipped[rec["skip"]] = skipped.get(rec["skip"], 0) + 1
            else:
                good += 1
    exp = written["expect"]
    assert good == exp["good"]  # train + val: every good record once
    assert skipped == {k: v for k, v in exp.items() if k != "good" and v}
    assert {"missing_field", "empty", "undecodable", "wrong_type"} <= set(skipped)


def test_job_resumes_only_missing_shards_and_ignores_half_shards(local_corpus, tmp_path):
    _, spec, tok, written = local_corpus
    ref = str(tmp_path / "ref")
    m = run_job(spec, tok, ref, workers=0, rows_per_shard=ROWS_PER_SHARD, progress=False)
    assert m["totals"]["docs"] == written["expect"]["good"]
    assert m["totals"]["skipped"]["wrong_type"] == written["expect"]["wrong_type"]
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["val"] and m["train"]
    assert check_tokenized(ref, tok)["totals"] == m["totals"]
    # weights: a source's weight split over its shards by their tokens
    assert sum(e["weight"] for e in m["train"]) == pytest.approx(1.0)

    out = tmp_path / "out"
    run_job(spec, tok, str(out), workers=0, rows_per_shard=ROWS_PER_SHARD, progress=False)
    (out / "manifest.json").unlink()
    (out / "train-00-fineweb-edu-00002.done.json").unlink()  # killed before its commit
    (out / "train-00-fineweb-edu-00002.bin").write_bytes(b"half a shard")
    (out / "val-00-fineweb-edu-00001.idx").write_bytes(b"torn")  # marker there, file wrong
    with pytest.raises(ValueError, match="unfinished.*run the same `make data` again"):
        check_tokenized(str(out), tok)
    again = run_job(spec, tok, str(out), workers=0, rows_per_shard=ROWS_PER_SHARD,
                    progress=False)
    assert again["totals"]["shards_made_this_run"] == 2
    for p in Path(ref).glob("*.[bi][id][nx]"):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_training_check_refuses_other_tokenizer_and_missing_shards(local_corpus, tmp_path):
    _, spec, tok, _ = local_corpus
    out = tmp_path / "d"
    run_job(spec, tok, str(out), workers=0, rows_per_shard=ROWS_PER_SHARD, progress=False)
    other = train_tokenizer(corpus_docs()[:20], 300)
    with pytest.raises(ValueError, match="another tokenizer"):
        check_tokenized(str(out), other)
    with pytest.raises(ValueError, match="another job's shards.*tokenizer"):
        run_job(spec, other, str(out), workers=0, rows_per_shard=ROWS_PER_SHARD,
                progress=False)
    next(out.glob("train-*.bin")).unlink()
    with pytest.raises(ValueError, match=r"shard train-.*\.bin is missing"):
        check_tokenized(str(out), tok, make_hint="make data ...")
    with pytest.raises(FileNotFoundError, match="missing.*make data X"):
        check_tokenized(str(tmp_path / "nothing"), tok, make_hint="make data X")


def test_tokenizer_trains_on_an_even_sample_and_saves_to_a_folder(local_corpus, tmp_path):
    root, _, _, _ = local_corpus
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec_dict(str(root))))
    from data_pipeline.__main__ import main

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(spec_file), "--vocab", "400",
                 "--sample-bytes", "20000", "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "tokenizer_info.json").read_text())
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 400 and info["sha256"] == tok.sha256
    # an equal share (20 kB / 12) of each train shard-to-be, each stopping past its quota: the
    # int-typed file's 3 give none, so 9 shares of ~1.7 kB plus at most a document each
    assert 9 * 20000 / 12 <= info["sample_bytes"] < 9 * (20000 / 12 + 3000)
    assert info["skipped"]["wrong_type"] > 0  # the int file was read too


# ---------------------------------------------------------------- the recipes


def test_recipe_derives_steps_batch_and_vocab_and_refuses_missing_inputs(tmp_path,
                                                                          monkeypatch):
    from launcher.engine.config import check_inputs, resolve
    from launcher.engine.describe import cost_estimate

    monkeypatch.setenv("STORAGE", str(tmp_path / "store"))
    run = resolve("B", world_size=32)
    t = run.train
    assert t.data == f"{tmp_path}/store/data/fineweb-edu-10BT.fineweb-edu-50k"
    assert t.global_batch_size * run.model.sequence_len == t.global_batch_tokens
    assert t.max_steps == -(-t.token_budget // t.global_batch_tokens)
    assert resolve("B", {"max_steps": "10"}).train.max_steps == 10  # extending a run wins
    with pytest.raises(FileNotFoundError) as e:
        check_inputs(run)
    assert "make tokenizer DATA=configs/data/fineweb-edu-10BT.yaml VOCAB=50304" in str(e.value)

    # the tokenizer there (a small one): vocab follows it, and the data is what is missing
    train_tokenizer(corpus_docs(), 300).save(f"{tmp_path}/store/tokenizers/fineweb-edu-50k")
    run = resolve("B", world_size=32)
    assert run.model.vocab_size == 320  # 300 padded to a multiple of 64
    with pytest.raises(FileNotFoundError) as e:
        check_inputs(run)
    assert "make data DATA=configs/data/fineweb-edu-10BT.yaml TOKENIZER=" in str(e.value)

    c = cost_estimate(run, 32)
    assert c["tokens"] == t.max_steps * t.global_batch_tokens
    assert c["flops"] == c["tokens"] * run.model.flops_per_token(training=True)
    for row in c["rows"]:
        assert row["gpu_hours"] == pytest.approx(
            c["flops"] / (row["peak_flops"] * row["mfu_assumed"]) / 3600)


# ---------------------------------------------------------------- on a bucket, make targets


def _make(target: str, *args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(["make", "--no-print-directory", target, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.fixture(scope="module")
def bucket_corpus(s3, module_cache):
    bucket = s3.bucket()
    written = write_fineweb_like(f"{bucket}/fineweb-edu", corpus_docs(), files=4,
                                 rows_per_group=4)
    fs = s3.fs()
    with fs.open(f"{bucket}/spec.json", "w") as f:
        json.dump(spec_dict(f"{bucket}/fineweb-edu"), f)
    env = {**os.environ, **s3.env, "TRMGPT_CACHE": str(module_cache),
           "RAY_USAGE_STATS_ENABLED": "0", "DATA_HUB_OFFLINE": "1"}
    return bucket, env, written, fs


@pytest.mark.slow
def test_make_tokenizer_then_make_data_killed_and_resumed_on_a_bucket(bucket_corpus):
    bucket, env, written, fs = bucket_corpus
    p = _make("tokenizer", f"DATA={bucket}/spec.json", "VOCAB=512", f"OUT={bucket}/tok",
              "SAMPLE=60000", env=env)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "wrote s3://" in out and "MB/s" in out
    tok = load_tokenizer(f"{bucket}/tok")
    assert tok.vocab_size == 512

    # the uninterrupted reference, in this process
    spec = DataSpec.parse(f"{bucket}/spec.json")
    ref = run_job(spec, tok, f"{bucket}/ref", workers=0, progress=False,
                  rows_per_shard=ROWS_PER_SHARD)
    n = ref["totals"]["shards"]

    # Killed: the in-process engine (WORKERS=0: no Ray start-up to wait through on 2 shared
    # cores); resumed: Ray Data on 2 local workers. Both are `make data`, the same bytes out.
    data = f"{bucket}/data"
    args = [f"DATA={bucket}/spec.json", f"TOKENIZER={bucket}/tok", f"OUT={data}",
            f"ARGS=--rows-per-shard {ROWS_PER_SHARD}"]
    p = _make("data", *args, "WORKERS=0", env={**env, "TRMGPT_DATA_TASK_DELAY_S": "1"})
    deadline = time.time() + 240
    done: list[str] = []
    while time.time() < deadline and len(done) < 3:
        time.sleep(0.5)
        fs.invalidate_cache()
        done = fs.glob(f"{data}/*.done.json")
        assert p.poll() is None, p.communicate()[0]
    os.killpg(p.pid, signal.SIGKILL)  # make and its python: all of it
    p.communicate()
    fs.invalidate_cache()
    killed_at = len(fs.glob(f"{data}/*.done.json"))
    assert 3 <= killed_at < n and not fs.exists(f"{data}/manifest.json")
    with pytest.raises(ValueError, match="unfinished"):
        check_tokenized(data, tok)

    p = _make("data", *args, "WORKERS=2", env=env)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert f"{killed_at} already committed (resumed), {n - killed_at} to make" in out
    manifest = check_tokenized(data, tok)
    assert manifest["totals"]["engine"] == "ray-data"
    assert manifest["totals"]["skipped"] == ref["totals"]["skipped"]
    assert manifest["totals"]["skipped"]["undecodable"] == written["expect"]["undecodable"]
    fs.invalidate_cache()
    for path in fs.glob(f"{bucket}/ref/*.bin") + fs.glob(f"{bucket}/ref/*.idx"):
        name = path.rsplit("/", 1)[1]
        assert fs.cat(f"{data}/{name}") == fs.cat(path), name


@pytest.mark.slow
def test_training_reads_the_shards_from_the_bucket_on_two_workers(bucket_corpus, tmp_path):
    bucket, env, _, fs = bucket_corpus
    tok_dir, data = f"{bucket}/tok2", f"{bucket}/data2"
    tok = train_tokenizer(corpus_docs(), 512)
    tok.save(tok_dir)
    run_job(DataSpec.parse(f"{bucket}/spec.json"), load_tokenizer(tok_dir), data, workers=0,
            progress=False, rows_per_shard=ROWS_PER_SHARD)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher", "train", "--preset", "tiny", "--workers", "2",
           "--run-dir", str(run_dir), "--data", data, "--set", f"tokenizer={tok_dir}",
           "--max-steps", "2", "--set", "eval_every=2", "--set", "eval_batches=1",
           "--set", "checkpoint_every=2", "--set", "device_batch_size=2"]
    res = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 512  # follows the tokenizer
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    assert any("val_bpb" in r for r in rows)


def _make_n(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_make_targets_show_their_commands_and_refuse_missing_variables():
    res = _make_n("-n", "tokenizer", "DATA=configs/data/fineweb-edu-10BT.yaml", "VOCAB=50304")
    assert res.returncode == 0, res.stderr
    assert ("python -m data_pipeline tokenizer train --data configs/data/fineweb-edu-10BT.yaml "
            "--vocab 50304 --sample-bytes 1e9") in res.stdout
    res = _make_n("-n", "data", "DATA=d.yaml", "TOKENIZER=t", "OUT=s3://b/x", "WORKERS=4")
    assert "python -m data_pipeline data --data d.yaml --tokenizer t --out s3://b/x --workers 4" \
        in res.stdout
    for args, msg in ((["tokenizer", "VOCAB=8"], "DATA is missing"),
                      (["tokenizer", "DATA=x"], "VOCAB must be a whole number"),
                      (["data", "DATA=x"], "TOKENIZER is missing")):
        res = _make_n(*args)
        assert res.returncode != 0 and msg in res.stderr, res.stderr
    assert "make tokenizer" in _make_n("help").stdout


def test_shards_shorter_than_a_sample_are_left_out_not_fatal(local_corpus, tmp_path, capsys,
                                                             module_cache):
    from data_pipeline import build_loader

    _, spec, tok, _ = local_corpus
    out = str(tmp_path / "d")
    m = run_job(spec, tok, out, workers=0, rows_per_shard=ROWS_PER_SHARD, progress=False)
    sizes = sorted(e["tokens"] for e in m["train"])
    seq = (sizes[0] + sizes[-1]) // 2  # longer than the shortest shard, shorter than the longest
    loader = build_loader(out, tok, split="train", batch_size=1, seq_len=seq)  # megatron asserts
    kept = sum(1 for t in sizes if t >= seq + 2)
    assert len(loader.sources) == kept < len(sizes)
    assert "are left out" in capsys.readouterr().out
    x, _ = next(iter(loader))
    assert x.shape == (1, seq)


def test_make_describe_prints_the_recipe_cost_and_what_is_missing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "STORAGE": str(tmp_path)}
    res = subprocess.run(["make", "--no-print-directory", "describe", "PRESET=B", "NODES=4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "recipe B: 3.50B tokens" in out and "MFU is an ASSUMPTION" in out
    for name in ("p4d.24xlarge", "p5.48xlarge", "a2-highgpu-8g", "a3-highgpu-8g"):
        assert name in out
    assert "inputs: NOT READY" in out and "make tokenizer DATA=configs/data/" in out


def test_make_data_with_a_job_api_address_that_nobody_answers_is_refused(tmp_path):
    from launcher.engine.dist import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    res = subprocess.run([sys.executable, "-m", "data_pipeline", "data", "--data", "x.yaml",
                          "--tokenizer", "t"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "no Ray cluster answers at RAY_ADDRESS=http://" in res.stderr
