"""Tests of the data pipeline: tokenizers, preprocessing, default corpus, GPT datasets, sampler."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import numpy
import pytest

from pretrain.data import (
    ByteTokenizer,
    HFTokenizer,
    build_data_iterator,
    build_gpt_datasets,
    build_tokenizer,
    ensure_default_corpus,
    parse_blend,
    read_documents,
    samples_per_split,
)
from pretrain.data import corpus as corpus_mod
from pretrain.data.preprocess import main as preprocess_main
from pretrain.platform import process_group_teardown

NON_ASCII = "naïve café — 日本語のテキスト 🎉 Ελληνικά"


def _decode_docs(prefix, tokenizer):
    """Each stored document decoded, checking and dropping its trailing eod."""
    out = []
    for ids in read_documents(prefix):
        assert int(ids[-1]) == tokenizer.eod
        out.append(tokenizer.detokenize(ids[:-1].tolist()))
    return out


def _write_docs(tmp_path, name, docs):
    """A .jsonl file with one document per line."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def _numbered_dataset(tmp_path, name="nums", n_docs=100):
    """A byte-tokenized dataset whose documents are recognisable: 'doc007:' + filler."""
    docs = [f"doc{i:03d}:" + "abcdefghij"[: 1 + i % 10] * (1 + i % 4) for i in range(n_docs)]
    prefix = str(tmp_path / name)
    assert preprocess_main(["--input", _write_docs(tmp_path, name, docs),
                            "--output-prefix", prefix, "--no-progress"]) == 0
    return prefix, docs


# --- tokenizers ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eod == 256
    for text in ["", "hello world\n", NON_ASCII, "<|endoftext|> is just text"]:
        ids = tok.tokenize(text)
        assert all(0 <= i < 256 for i in ids)  # special tokens never come from text
        assert tok.detokenize(ids) == text
    assert tok.detokenize(tok.tokenize("ab") + [tok.eod] + tok.tokenize("cd")) == "abcd"
    assert build_tokenizer("byte").vocab_size == 257


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    """A tiny byte-level BPE trained here and saved as a tokenizers JSON file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", NON_ASCII] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(hf_tokenizer_file):
    tok = build_tokenizer("hf", hf_tokenizer_file)
    assert isinstance(tok, HFTokenizer)
    assert tok.eod == 0 and tok.vocab_size <= 400
    for text in ["the lazy fox", NON_ASCII]:
        assert tok.detokenize(tok.tokenize(text)) == text
    with pytest.raises(ValueError, match=r"tokenizer\.json.*'</s>'"):
        build_tokenizer("hf", hf_tokenizer_file, eod_token="</s>")
    with pytest.raises(ValueError, match="needs a tokenizer JSON"):
        build_tokenizer("hf")


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_text_and_jsonl(tmp_path):
    paragraphs = ["First paragraph,\ntwo lines.", NON_ASCII, "third\r\nwith CRLF"]
    txt = tmp_path / "a.txt"
    txt.write_bytes(("\n\n".join(paragraphs) + "\n\n\n").encode("utf-8"))
    records = ["json one", "json two " + NON_ASCII]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": records[0], "id": 1}) + "\n\n"
                     + json.dumps({"text": records[1]}) + "\n", encoding="utf-8")

    prefix = str(tmp_path / "out" / "mix")
    assert preprocess_main(["--input", str(txt), str(jsonl), "--output-prefix", prefix,
                            "--append-eod", "--no-progress"]) == 0
    assert _decode_docs(prefix, ByteTokenizer()) == paragraphs + records

    # One document per file; and several worker processes give the same bytes as one.
    whole = str(tmp_path / "whole")
    assert preprocess_main(["--input", str(txt), "--output-prefix", whole, "--text-doc", "file",
                            "--no-progress"]) == 0
    assert _decode_docs(whole, ByteTokenizer()) == [txt.read_bytes().decode("utf-8")]
    parallel = str(tmp_path / "parallel")
    assert preprocess_main(["--input", str(txt), str(jsonl), "--output-prefix", parallel,
                            "--workers", "2", "--no-progress"]) == 0
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as a, open(parallel + ext, "rb") as b:
            assert a.read() == b.read()


def test_preprocess_hf_tokenizer_and_datasets(tmp_path, hf_tokenizer_file):
    docs = [f"the quick brown fox number {i} jumps" for i in range(40)]
    prefix = str(tmp_path / "hf")
    assert preprocess_main(["--input", _write_docs(tmp_path, "hf", docs), "--output-prefix",
                            prefix, "--tokenizer", "hf", "--tokenizer-file", hf_tokenizer_file,
                            "--no-progress"]) == 0
    tok = build_tokenizer("hf", hf_tokenizer_file)
    assert _decode_docs(prefix, tok) == docs
    # GPTDatasetConfig accepts the HF tokenizer.
    ds = build_gpt_datasets(tok, 8, blend=[prefix], split="90,10,0", train_samples=20,
                            valid_samples=4)
    assert ds.train[0]["tokens"].shape == (8,)


def test_preprocess_bad_input_exits_nonzero_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    out_dir = tmp_path / "out"
    # The installed console script, as a user would run it.
    script = os.path.join(os.path.dirname(sys.executable), "pretrain-preprocess")
    proc = subprocess.run([script, "--input", str(bad), "--output-prefix", str(out_dir / "x"),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{bad}:3: invalid JSON" in proc.stderr
    assert not out_dir.exists()

    missing_key = tmp_path / "nokey.jsonl"
    missing_key.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    (tmp_path / "out2").mkdir()
    assert preprocess_main(["--input", str(missing_key), "--output-prefix",
                            str(tmp_path / "out2" / "x"), "--no-progress"]) == 1
    assert os.listdir(tmp_path / "out2") == []

    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("ok\n\ncaf\xe9\n".encode("latin-1"))
    assert preprocess_main(["--input", str(bad_utf8), "--output-prefix",
                            str(tmp_path / "out2" / "y"), "--no-progress"]) == 1
    assert os.listdir(tmp_path / "out2") == []


def test_preprocess_error_messages(tmp_path, capsys):
    missing_key = tmp_path / "nokey.jsonl"
    missing_key.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert preprocess_main(["--input", str(missing_key), "--output-prefix",
                            str(tmp_path / "x"), "--no-progress"]) == 1
    assert f"{missing_key}:2: missing key 'text'" in capsys.readouterr().err
    assert preprocess_main(["--input", str(tmp_path / "nope.txt"), "--output-prefix",
                            str(tmp_path / "x"), "--no-progress"]) == 1
    assert "nope.txt" in capsys.readouterr().err


# --- default corpus -----------------------------------------------------------------------------


def _ensure_in(cache_dir, queue):
    queue.put(ensure_default_corpus(cache_dir))


def test_default_corpus_deterministic_and_reused(tmp_path):
    a = ensure_default_corpus(str(tmp_path / "a"))
    b = ensure_default_corpus(str(tmp_path / "b"))
    assert os.path.basename(a) == os.path.basename(b)
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            assert fa.read() == fb.read()
    n_tokens = os.path.getsize(a + ".bin") // 2  # uint16 tokens
    assert n_tokens >= 300_000
    docs = list(read_documents(a))
    assert len(docs) >= 50 and sum(len(d) for d in docs) == n_tokens
    assert "lambda" in ByteTokenizer().detokenize(numpy.concatenate(docs).tolist())

    mtime = os.stat(a + ".bin").st_mtime_ns
    assert ensure_default_corpus(str(tmp_path / "a")) == a  # reused, not rebuilt
    assert os.stat(a + ".bin").st_mtime_ns == mtime

    # Several processes at once (as torchrun ranks would) agree on one complete build.
    # (fork is safe here: the children run no torch operations.)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in, args=(str(tmp_path / "c"), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    prefixes = {queue.get() for _ in procs}
    assert len(prefixes) == 1
    with open(prefixes.pop() + ".bin", "rb") as fc, open(a + ".bin", "rb") as fa:
        assert fc.read() == fa.read()
    assert sorted(f for f in os.listdir(tmp_path / "c") if not f.startswith(".build")) == \
        sorted(os.path.basename(a) + ext for ext in (".bin", ".idx", ".tokenizer.json"))


def test_default_corpus_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus_mod.CACHE_ENV, str(tmp_path / "env"))
    assert corpus_mod.default_cache_dir() == str(tmp_path / "env")


# --- GPT datasets -------------------------------------------------------------------------------


def test_build_gpt_datasets_samples_and_splits(tmp_path):
    prefix, docs = _numbered_dataset(tmp_path)
    tok = ByteTokenizer()
    seq = 16
    ds = build_gpt_datasets(tok, seq, blend=[prefix], split="80,10,10", seed=7,
                            train_samples=300, valid_samples=40, test_samples=10,
                            index_cache_dir=str(tmp_path / "cache"))
    # Split by document: 80 / 10 / 10 of the 100 documents.
    assert [len(d.indices) for d in ds] == [80, 10, 10]
    assert len(ds.train) >= 300 and len(ds.valid) >= 40 and len(ds.test) >= 10

    split_docs = {"train": docs[:80], "valid": docs[80:90], "test": docs[90:]}
    for name, dataset in zip(("train", "valid", "test"), ds):
        for i in range(len(dataset)):
            sample = dataset[i]
            tokens, labels = sample["tokens"], sample["labels"]
            assert tokens.shape == labels.shape == (seq,)
            assert sample["loss_mask"].shape == (seq,)
            assert sample["attention_mask"].shape == (1, seq, seq)
            # labels are the next tokens: the sample read seq_length + 1 tokens.
            assert labels[:-1].tolist() == tokens[1:].tolist()
            window = tokens.tolist() + [int(labels[-1])]
            # Every piece between eods comes from one document of this split.
            pieces = tok.detokenize(
                [t if t != tok.eod else ord("\x00") for t in window]).split("\x00")
            for piece in pieces:
                assert any(piece in d for d in split_docs[name]), (name, piece)

    # Same seed, fresh index cache: the same samples.
    again = build_gpt_datasets(tok, seq, blend=[prefix], split="80,10,10", seed=7,
                               train_samples=300, valid_samples=40, test_samples=10,
                               index_cache_dir=str(tmp_path / "cache2"))
    for i in (0, 5, 299):
        assert again.train[i]["tokens"].tolist() == ds.train[i]["tokens"].tolist()


def test_build_gpt_datasets_weighted_blend(tmp_path):
    a, _ = _numbered_dataset(tmp_path, "a")
    b, _ = _numbered_dataset(tmp_path, "b", n_docs=60)
    ds = build_gpt_datasets(ByteTokenizer(), 16, blend=["0.7", a, "0.3", b], split="90,10,0",
                            train_samples=200, valid_samples=20)
    assert ds.test is None
    assert len(ds.train) >= 200 and len(ds.valid) >= 20
    ids = numpy.array([int(ds.train[i]["dataset_id"]) for i in range(len(ds.train))])
    assert abs((ids == 0).mean() - 0.7) < 0.05


def test_preprocess_records_the_tokenizer_and_start_up_checks_it(tmp_path, hf_tokenizer_file):
    """Data preprocessed with one tokenizer and trained with another is refused, naming both."""
    from pretrain.data.provenance import TokenizerMismatchError, file_sha256, read_record

    docs = [f"the quick brown fox number {i} jumps" for i in range(40)]
    prefix = str(tmp_path / "hf")
    assert preprocess_main(["--input", _write_docs(tmp_path, "hf", docs), "--output-prefix", prefix,
                            "--tokenizer", "hf", "--tokenizer-file", hf_tokenizer_file, "--no-progress"]) == 0
    hf = build_tokenizer("hf", hf_tokenizer_file)
    record = read_record(prefix)
    largest = max(int(ids.max()) for ids in read_documents(prefix))
    assert record == {"kind": "hf", "vocab_size": hf.vocab_size, "eod": hf.eod, "max_token_id": largest,
                      "tokenizer_file": os.path.abspath(hf_tokenizer_file),
                      "tokenizer_sha256": file_sha256(hf_tokenizer_file)}
    assert largest >= ByteTokenizer().vocab_size  # the byte model's embedding would index out of range

    with pytest.raises(TokenizerMismatchError) as info:
        build_gpt_datasets(ByteTokenizer(), 8, blend=[prefix], split="90,10,0", train_samples=20)
    message = str(info.value)
    assert "preprocessed with the hf tokenizer (vocab_size" in message and "uses the byte tokenizer (vocab_size 257)" in message
    assert f"data.tokenizer=hf data.tokenizer_file={os.path.abspath(hf_tokenizer_file)}" in message

    # Without the record (data from elsewhere) the largest token id is read from the .bin.
    os.remove(prefix + ".tokenizer.json")
    with pytest.raises(TokenizerMismatchError, match=rf"token id {largest} is out of range for the byte tokenizer"):
        build_gpt_datasets(ByteTokenizer(), 8, blend=[prefix], split="90,10,0", train_samples=20)
    build_gpt_datasets(hf, 8, blend=[prefix], split="90,10,0", train_samples=20)  # the right one passes

    # Byte data read with the hf tokenizer: ids in range, but a different vocabulary.
    byte_prefix, _ = _numbered_dataset(tmp_path, n_docs=20)
    assert read_record(byte_prefix)["kind"] == "byte"
    with pytest.raises(TokenizerMismatchError, match=r"preprocessed with the byte tokenizer .* uses the hf"):
        build_gpt_datasets(hf, 8, blend=[byte_prefix], split="90,10,0", train_samples=20)


def test_pretrain_refuses_data_of_another_tokenizer(tmp_path, hf_tokenizer_file):
    """Through `python -m pretrain`: one `error:` line naming the key, exit status 1, before any step."""
    prefix = str(tmp_path / "hf")
    assert preprocess_main(["--input", _write_docs(tmp_path, "hf", ["the lazy dog"] * 40), "--output-prefix",
                            prefix, "--tokenizer", "hf", "--tokenizer-file", hf_tokenizer_file, "--no-progress"]) == 0
    proc = subprocess.run([sys.executable, "-m", "pretrain", f"data.data_path=[{prefix}]", "data.split=90,10,0",
                           "train.train_iters=2", "checkpoint.save=null", "merge.enabled=false"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "data.data_path / data.tokenizer:" in errors[0] and "data.tokenizer=hf" in errors[0]
    assert "Traceback" not in proc.stderr


def test_default_corpus_datasets(tmp_path):
    ds = build_gpt_datasets(ByteTokenizer(), 32, train_samples=64, valid_samples=8,
                            corpus_cache_dir=str(tmp_path / "corpus"))
    assert len(ds.train) >= 64 and ds.train[0]["tokens"].shape == (32,)


def test_missing_or_bad_data_fails_clearly(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match=r"nope\.bin.*nope\.idx"):
        build_gpt_datasets(tok, 16, blend=[str(tmp_path / "nope")], train_samples=10)
    prefix, _ = _numbered_dataset(tmp_path, n_docs=5)
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"nums\.idx") as info:
        build_gpt_datasets(tok, 16, blend=[prefix], train_samples=10)
    assert "nums.bin" not in str(info.value)
    tiny, _ = _numbered_dataset(tmp_path, "tiny", n_docs=3)
    with pytest.raises(ValueError, match="valid split"):
        build_gpt_datasets(tok, 16, blend=[tiny], split="98,2,0", train_samples=10,
                           valid_samples=2)
    with pytest.raises(ValueError, match="split must look like"):
        build_gpt_datasets(tok, 16, blend=[tiny], split="train", train_samples=10)


@process_group_teardown()
def _build_in_process_group(rank, world, init_file, blend, cache, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    ds = build_gpt_datasets(ByteTokenizer(), 16, blend=blend, split="90,10,0",
                            train_samples=100, valid_samples=10, index_cache_dir=cache)
    queue.put((rank, [ds.train[i]["tokens"].tolist() for i in range(0, 100, 7)]))


def test_build_gpt_datasets_under_torch_distributed(tmp_path):
    a, _ = _numbered_dataset(tmp_path, "a")
    b, _ = _numbered_dataset(tmp_path, "b", n_docs=60)
    blend = ["0.5", a, "0.5", b]
    # spawn, not fork: torch's OpenMP pool, used by earlier tests, deadlocks in forked children.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process_group,
                         args=(r, 2, str(tmp_path / "pg"), blend, str(tmp_path / "ic"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = dict(queue.get() for _ in procs)
    assert results[0] == results[1]  # rank 1 loads what rank 0 built
    single = build_gpt_datasets(ByteTokenizer(), 16, blend=blend, split="90,10,0",
                                train_samples=100, valid_samples=10,
                                index_cache_dir=str(tmp_path / "ic-single"))
    assert results[0] == [single.train[i]["tokens"].tolist() for i in range(0, 100, 7)]


def test_parse_blend():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend("1 a 3 b") == (["a", "b"], [1.0, 3.0])
    with pytest.raises(ValueError):
        parse_blend(["0.7", "a", "b"])


def test_samples_per_split():
    # 100 iterations of 8 samples; 2 eval batches every 25 iterations and at the end.
    assert samples_per_split(100, 8, 25, 2) == (800, 5 * 2 * 8, 2 * 8)


# --- sampler ------------------------------------------------------------------------------------


def test_data_iterator_resumes_exactly(tmp_path):
    prefix, _ = _numbered_dataset(tmp_path)
    ds = build_gpt_datasets(ByteTokenizer(), 8, blend=[prefix], split="100,0,0",
                            train_samples=100, create_attention_mask=False)
    mbs, dp = 2, 3
    full = {r: [b["tokens"] for b in build_data_iterator(ds.train, mbs, dp_rank=r, dp_size=dp)]
            for r in range(dp)}
    steps = len(ds.train) // (mbs * dp)
    assert all(len(v) == steps for v in full.values())

    # Ranks read disjoint slices of each step, covering it.
    first_step = numpy.concatenate([full[r][0].numpy() for r in range(dp)])
    expected = numpy.stack([ds.train[i]["tokens"].numpy() for i in range(mbs * dp)])
    assert (first_step == expected).all()

    batch = next(build_data_iterator(ds.train, mbs))
    assert batch["attention_mask"] is None and batch["tokens"].shape == (mbs, 8)

    # Resume after k steps: exactly the remaining batches of the uninterrupted run.
    k = 5
    for r in range(dp):
        resumed = [b["tokens"] for b in build_data_iterator(
            ds.train, mbs, dp_rank=r, dp_size=dp, consumed_samples=k * mbs * dp)]
        assert len(resumed) == steps - k
        assert all((x == y).all() for x, y in zip(resumed, full[r][k:]))

    # Cyclic iteration wraps to the start, and resumes consistently across the wrap.
    cyc = build_data_iterator(ds.train, mbs, dp_rank=1, dp_size=dp, cyclic=True)
    seen = [next(cyc)["tokens"] for _ in range(steps + 2)]
    assert (seen[steps] == full[1][0]).all()
    wrapped = build_data_iterator(ds.train, mbs, dp_rank=1, dp_size=dp,
                                  consumed_samples=(steps + 1) * mbs * dp, cyclic=True)
    assert (next(wrapped)["tokens"] == seen[steps + 1]).all()


def test_preprocess_warns_when_workers_exceed_the_cores(tmp_path, caplog):
    cores = len(os.sched_getaffinity(0))
    source = _write_docs(tmp_path, "w", ["one", "two", "three"])
    with caplog.at_level("WARNING"):
        assert preprocess_main(["--input", source, "--output-prefix", str(tmp_path / "w"), "--no-progress",
                                "--workers", str(cores + 1)]) == 0
    assert f"--workers {cores + 1} is more than the {cores} CPU cores available" in caplog.text
