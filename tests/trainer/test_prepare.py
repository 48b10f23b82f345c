"""prepare: local split determinism, the three file formats, climbmix over a local HTTP server."""

import filecmp
import http.server
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import ClimbmixSource, LocalSource, load_program
from trainer.download import DownloadError, download
from trainer.prepare import main as prepare_main
from trainer.prepare import prepare
from trainer.shards import open_split, read_meta
from trainer.sources import is_val, local_docs, shard_name
from trainer.tokenizer import load_tokenizer
from trainer_testlib import corpus_docs, words, write_corpus


def split_docs(data, split):
    enc, s = load_tokenizer(data), open_split(data, split)
    return {enc.decode(s.doc(i)[1:].tolist()) for i in range(s.num_docs)}


def test_is_val_is_deterministic_and_near_the_fraction():
    docs = [f"document {i}" for i in range(4000)]
    flags = [is_val(d, 0.1) for d in docs]
    assert flags == [is_val(d, 0.1) for d in docs]
    assert 300 < sum(flags) < 500


def test_local_reads_all_formats_and_skips_hidden(corpus):
    src = LocalSource(paths=[str(corpus)], val_fraction=0.2)
    docs = [*local_docs(src, "train"), *local_docs(src, "val")]
    assert sorted(docs) == sorted(corpus_docs())  # txt (nested), .jsonl and .parquet, nothing else


def test_local_split_is_deterministic_across_runs_and_file_layouts(tmp_path, corpus, corpus_program,
                                                                   corpus_data):
    program = load_program(corpus_program)
    again = tmp_path / "again"
    prepare(program, LocalSource(paths=[str(corpus)], val_fraction=0.2), again)
    for name in ["train.bin", "val.bin", "train.idx.npy", "val.idx.npy", "tokenizer.pkl"]:
        assert filecmp.cmp(corpus_data / name, again / name, shallow=False), name
    # the same documents, shuffled into other files and formats: the same split
    docs = corpus_docs()
    moved = write_corpus(tmp_path / "moved", docs[::-1])
    other = tmp_path / "other"
    prepare(program, LocalSource(paths=[str(moved)], val_fraction=0.2), other)
    assert split_docs(other, "val") == split_docs(corpus_data, "val")
    assert split_docs(other, "val") == {d for d in docs if is_val(d, 0.2)}
    assert split_docs(other, "train").isdisjoint(split_docs(other, "val"))


def test_prepare_skips_when_up_to_date(corpus, corpus_program, corpus_data, capsys):
    program = load_program(corpus_program)
    before = (corpus_data / "meta.json").stat().st_mtime_ns
    prepare(program, LocalSource(paths=[str(corpus)], val_fraction=0.2), corpus_data)
    assert (corpus_data / "meta.json").stat().st_mtime_ns == before
    assert "already prepared" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, corpus_program, capsys):
    assert prepare_main(["--program", str(corpus_program), "--data-dir", str(tmp_path / "d"),
                         "--path", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert prepare_main(["--program", str(tmp_path / "nope.toml"), "--data-dir", str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err


# ---- climbmix over HTTP -------------------------------------------------------------------

class ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; can cut a response short once per file."""

    root = None
    cut_once: set = set()
    log: list = []

    def do_GET(self):
        path = self.root / self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.log.append((self.path, rng))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.name in self.cut_once:  # drop the connection half way through
            self.cut_once.discard(path.name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def shard_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    for index, n in [(0, 50), (1, 40), (6542, 30)]:
        texts = [f"shard {index} doc {i}: {words(index + i, 60)}" for i in range(n)]
        pq.write_table(pa.table({"text": texts, "id": list(range(n))}), root / shard_name(index))
    handler = type("H", (ShardHandler,), {"root": root, "cut_once": set(), "log": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def climbmix_program(tmp_path):
    path = tmp_path / "program.toml"
    path.write_text('name = "cm"\nseq_len = 32\nvocab_size = 300\neval_batch_size = 2\n'
                    'eval_tokens = 64\ndevice = "cpu"\n[data]\nkind = "climbmix"\nnum_train_shards = 2\n'
                    'retries = 3\nbackoff_s = 0.01\ntimeout_s = 5\n')
    return path


def test_climbmix_download_retries_and_resumes(tmp_path, shard_server):
    url, handler = shard_server
    handler.cut_once.add(shard_name(1))
    data = tmp_path / "data"
    assert prepare_main(["--program", str(climbmix_program(tmp_path)), "--data-dir", str(data),
                         "--base-url", url]) == 0
    meta = read_meta(data)
    assert meta["splits"]["train"]["documents"] == 90 and meta["splits"]["val"]["documents"] == 30
    for index in (0, 1, 6542):
        assert (data / "raw" / shard_name(index)).read_bytes() == (handler.root / shard_name(index)).read_bytes()
    ranges = [r for p, r in handler.log if p.endswith(shard_name(1))]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert all("shard 6542" in d for d in split_docs(data, "val"))


def test_climbmix_resumes_a_part_file_from_an_earlier_run(tmp_path, shard_server):
    url, handler = shard_server
    full = (handler.root / shard_name(0)).read_bytes()
    dest = tmp_path / "raw" / shard_name(0)
    dest.parent.mkdir()
    (dest.parent / (dest.name + ".part")).write_bytes(full[:100])
    download(f"{url}/{shard_name(0)}", dest, retries=0)
    assert dest.read_bytes() == full
    assert handler.log == [(f"/{shard_name(0)}", "bytes=100-")]


def test_offline_is_a_clear_error(tmp_path):
    src = ClimbmixSource(base_url="http://127.0.0.1:9", retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(DownloadError) as info:
        download(f"{src.base_url}/{shard_name(0)}", tmp_path / shard_name(0), retries=1, backoff_s=0.01)
    assert isinstance(info.value, ConnectionError)
    assert "2 attempts" in str(info.value) and "--source local" in str(info.value)
    assert not (tmp_path / shard_name(0)).exists()


def test_missing_shard_fails_at_once(tmp_path, shard_server):
    url, handler = shard_server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{url}/{shard_name(7)}", tmp_path / shard_name(7), retries=5, backoff_s=10)
    assert len(handler.log) == 1
