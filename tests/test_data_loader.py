"""Token shards and the packed loader (nanoseek.data.shards / loader)."""

import json

import numpy as np
import pytest
import torch

from nanoseek.data.corpus import synthetic_corpus
from nanoseek.data.loader import PackedLoader
from nanoseek.data.shards import open_shards, write_shards
from nanoseek.data.tokenizer import train_tokenizer


class BigVocab:
    """Stand-in tokenizer with ids above 65535: one id per character, offset by 70000."""

    vocab_size, eos_id = 80_000, 79_999

    def encode_batch(self, texts):
        return [[70_000 + ord(c) % 9_000 for c in t] for t in texts]


class Positions:
    """Stand-in tokenizer reading whitespace-separated ids, so a test can write any token stream."""

    vocab_size, eos_id = 2**16, 2**16 - 1

    def encode_batch(self, texts):
        return [[int(t) for t in text.split()] for text in texts]


@pytest.fixture(scope="module")
def docs():
    return synthetic_corpus(200, seed=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs):
    return train_tokenizer(docs, vocab_size=512, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, docs, tok):
    out = tmp_path_factory.mktemp("data") / "shards"
    write_shards(docs, tok, out, shard_tokens=5_000, batch_docs=64)  # several shards: windows straddle edges
    return out


def stream_of(shard_dir):
    shards, _ = open_shards(shard_dir)
    return np.concatenate(shards).astype(np.int64)


def test_shards_hold_docs_joined_by_eos(shard_dir, docs, tok):
    shards, manifest = open_shards(shard_dir, check_hash=True)
    expected = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    assert stream_of(shard_dir).tolist() == expected
    assert manifest["dtype"] == "uint16" and shards[0].dtype == np.uint16
    assert manifest["total_tokens"] == len(expected) and manifest["n_docs"] == len(docs)
    assert manifest["vocab_size"] == 512 and manifest["eos_id"] == tok.eos_id
    assert [s["tokens"] for s in manifest["shards"][:-1]] == [5_000] * (len(shards) - 1) and len(shards) > 3
    assert sorted(p.name for p in shard_dir.parent.iterdir()) == ["shards"]  # no temp folder left behind


def test_uint32_for_large_vocab(tmp_path):
    manifest = write_shards(["ab", "c"], BigVocab(), tmp_path / "s")
    shards, _ = open_shards(tmp_path / "s")
    assert manifest["dtype"] == "uint32" and shards[0].tolist() == [70_097, 70_098, 79_999, 70_099, 79_999]


def test_write_is_atomic_and_guarded(tmp_path, tok):
    out = tmp_path / "s"
    write_shards(["one doc"], tok, out)
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        write_shards(["two"], tok, out)

    def failing():
        yield "fine"
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        write_shards(failing(), tok, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # old data intact, temp folder gone
    assert open_shards(out)[1]["n_docs"] == 1
    write_shards(["two", "three"], tok, out, overwrite=True)
    assert open_shards(out)[1]["n_docs"] == 2
    with pytest.raises(ValueError, match="no documents"):
        write_shards([], tok, tmp_path / "empty")


def test_open_shards_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="no manifest.json.*write_shards"):
        open_shards(tmp_path)
    out = tmp_path / "s"
    write_shards(["some text here"], tok, out)
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(manifest[:40])
    with pytest.raises(ValueError, match="corrupt manifest"):
        open_shards(out)
    (out / "manifest.json").write_text(manifest.replace('"uint16"', '"int8"'))
    with pytest.raises(ValueError, match="corrupt manifest"):
        open_shards(out)
    (out / "manifest.json").write_text(manifest)
    shard = out / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="shard_00000.bin has .* bytes"):
        open_shards(out)
    shard.write_bytes(b"\xff\xff" * (json.loads(manifest)["total_tokens"]))
    with pytest.raises(ValueError, match="sha256"):
        open_shards(out, check_hash=True)


def test_batches_are_shifted_windows(tmp_path):
    """On a stream whose tokens are their own positions, each row is visibly the window it came from."""
    seq_len, batch, n = 16, 4, 1_000
    write_shards([" ".join(map(str, range(n - 1)))], Positions(), tmp_path / "s", shard_tokens=100)
    stream = stream_of(tmp_path / "s")
    loader = PackedLoader(tmp_path / "s", seq_len, batch, seed=0)
    assert len(loader) == (n - 1) // seq_len // batch
    seen = []
    for _ in range(len(loader)):
        x, y = next(loader)
        assert x.shape == y.shape == (batch, seq_len) and x.dtype == y.dtype == torch.long
        assert x.is_contiguous() and y.is_contiguous()
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            w = int(row_x[0]) // seq_len
            assert (row_x == stream[w * seq_len : (w + 1) * seq_len]).all()
            assert (row_y == stream[w * seq_len + 1 : (w + 1) * seq_len + 1]).all()
            seen.append(w)
    assert len(set(seen)) == len(seen) == len(loader) * batch  # an epoch never repeats a window
    assert seen != sorted(seen)  # shuffled


def test_resume_is_exact(shard_dir):
    def batches(loader, n):
        return [torch.cat(next(loader)) for _ in range(n)]

    ref = PackedLoader(shard_dir, seq_len=32, batch_size=8, seed=3)
    steps = len(ref)
    expected = batches(ref, steps + 5)  # runs into the second epoch
    for stop in (0, 3, steps - 1, steps, steps + 2):
        run = PackedLoader(shard_dir, seq_len=32, batch_size=8, seed=3)
        batches(run, stop)
        state = run.state_dict()
        resumed = PackedLoader(shard_dir, seq_len=32, batch_size=8, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
        got = batches(resumed, steps + 5 - stop)
        assert all(torch.equal(a, b) for a, b in zip(got, expected[stop:]))
    assert not torch.equal(expected[0], expected[steps])  # a new epoch, a new order
    other = PackedLoader(shard_dir, seq_len=32, batch_size=8, seed=4)
    assert not torch.equal(next(other)[0], expected[0][:8])


def test_ranks_split_the_global_batch(shard_dir):
    whole = PackedLoader(shard_dir, seq_len=16, batch_size=6, seed=1)
    ranks = [
        PackedLoader(shard_dir, seq_len=16, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)
    ]
    assert len(ranks[0]) == len(whole)
    for _ in range(3):
        x, _ = next(whole)
        assert torch.equal(torch.cat([next(r)[0] for r in ranks]), x)


def test_loader_errors(shard_dir):
    total = open_shards(shard_dir)[1]["total_tokens"]
    with pytest.raises(ValueError, match=rf"holds {total} tokens, but one step needs {64 * 2 * 4096 + 1}"):
        PackedLoader(shard_dir, seq_len=4096, batch_size=64, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        PackedLoader(shard_dir, seq_len=16, batch_size=2, seed=0, rank=2, world_size=2)
    state = PackedLoader(shard_dir, seq_len=16, batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len=16 but this loader has seq_len=8"):
        PackedLoader(shard_dir, seq_len=8, batch_size=2, seed=0).load_state_dict(state)
