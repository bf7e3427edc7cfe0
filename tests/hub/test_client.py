"""Zoo client: manifest validation, verified/resumable/atomic downloads, cache checks, weights.

All network traffic goes to an HTTP server on 127.0.0.1 that each test starts itself.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from solo_deepfusion import cli as top_cli
from solo_deepfusion import hub
from solo_deepfusion._host import INSTALL_HINT
from solo_deepfusion.atomic import atomic_path
from solo_deepfusion.hub import cli
from solo_deepfusion.hub.publish import file_record as publish_record
from solo_deepfusion.hub.publish import update_manifest

pytestmark = pytest.mark.timeout(60)

SIZE = 3 * 1024 * 1024 + 123  # a few 1 MiB chunks plus a tail
PAYLOAD = random.Random(0).randbytes(SIZE)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ----------------------------------------------------------------------------- local HTTP server


@dataclass
class Route:
    data: bytes = PAYLOAD
    status: int = 200  # 404 → not found
    honour_range: bool = True
    corrupt: bool = False  # flip one byte (same size)
    cut_after: list[int] = field(default_factory=list)  # per request: close after N body bytes
    redirect: str | None = None
    trickle_s: float | None = None  # send the body one byte at a time, this far apart
    stall_after: int | None = None  # send this many body bytes, then nothing until closed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _empty(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, rng))
            route = srv.routes.get(self.path)
            cut = route.cut_after.pop(0) if route and route.cut_after else None
        if route is None or route.status == 404:
            return self._empty(404)
        if route.redirect:
            return self._empty(302, {"Location": route.redirect})
        data = bytes([route.data[0] ^ 1]) + route.data[1:] if route.corrupt else route.data
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and route.honour_range:
            start = int(m[1])
            if start >= len(data):
                return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route.stall_after is not None:
            self.wfile.write(body[: route.stall_after])
            self.wfile.flush()
            srv.closing.wait(60)  # a stalled server: the connection stays open, silent
            self.close_connection = True
            return
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        try:
            if route.trickle_s is None:
                self.wfile.write(body)
            for byte in body if route.trickle_s is not None else ():
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(route.trickle_s)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this mirror
            self.close_connection = True


class Server:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.routes = {}
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.httpd.closing = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def routes(self) -> dict[str, Route]:
        return self.httpd.routes

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.httpd.requests

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    for var in (
        "SOLO_DEEPFUSION_OFFLINE",
        "HF_HUB_OFFLINE",
        "SOLO_DEEPFUSION_ZOO_MANIFEST",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SOLO_DEEPFUSION_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- manifest helpers


def file_rec(urls, role="backbone", filename=None, data=PAYLOAD) -> dict:
    if filename is None:
        filename = {"backbone": "backbone.safetensors", "args": "args.json"}.get(
            role, "full.safetensors"
        )
    return {
        "role": role,
        "filename": filename,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "urls": list(urls),
    }


def entry_rec(name="m1", files=None) -> dict:
    return {
        "name": name,
        "method": "simclr",
        "projector": {"name": "deepfusion", "num_layers": 2, "num_heads": 8},
        "backbone": {"name": "resnet18", "kwargs": {}, "stem": "cifar"},
        "dataset": "cifar10",
        "epochs": 10,
        "recipe": "solo_deepfusion/configs/pretrain/simclr_deepfusion.yaml",
        "metrics": [
            {"name": "acc1", "value": 80.5, "protocol": {"kind": "online_linear", "split": "val"}},
            {
                "name": "acc1",
                "value": 79.0,
                "protocol": {"kind": "knn", "k": 200, "temperature": 0.1},
            },
        ],
        "params": {"backbone": 11_000_000, "head": 500_000},
        "files": files if files is not None else [file_rec(["backbone.safetensors"])],
        "license": "MIT",
        "date": "2026-01-31",
        "code_commit": "0123abc",
    }


def write_manifest(folder: Path, entries: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"schema_version": 1, "models": entries}, sort_keys=False))
    return path


def one_file_entry(urls, name="m1", **kw) -> hub.ZooEntry:
    rec = file_rec(urls, **kw)
    zf = hub.ZooFile(rec["role"], rec["filename"], rec["size"], rec["sha256"], tuple(urls))
    return hub.ZooEntry(name=name, files=(zf,))


def cache_file(tmp_path, name="m1", filename="backbone.safetensors") -> Path:
    return tmp_path / "cache" / name / filename


# ----------------------------------------------------------------------------- downloads


def test_a_trickling_mirror_is_given_up_at_its_deadline_for_the_next(server, tmp_path):
    server.routes["/slow"] = Route(trickle_s=0.05)
    server.routes["/fast"] = Route()
    urls = [server.url("/slow"), server.url("/fast")]
    manifest = write_manifest(tmp_path / "zoo", [entry_rec(files=[file_rec(urls)])])
    began = time.monotonic()
    path = hub.download("m1", manifest=manifest, progress=False, deadline_s=1.0)
    assert time.monotonic() - began < 10 and path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/slow", "/fast"]


def test_only_slow_mirrors_fail_with_the_reason(server, tmp_path):
    server.routes["/slow"] = Route(trickle_s=0.05)
    manifest = write_manifest(
        tmp_path / "zoo", [entry_rec(files=[file_rec([server.url("/slow")])])]
    )
    with pytest.raises(hub.DownloadError, match=r"too slow: \d+ of 3145851 bytes"):
        hub.download("m1", manifest=manifest, progress=False, deadline_s=0.5)


def test_a_mirror_that_stalls_after_the_headers_is_left_at_its_deadline(server, tmp_path, capsys):
    """Headers and 10 bytes, then silence: ``zoo download --deadline 5`` takes the next mirror
    within about 10 s (the stall is cut at the deadline, not a 30 s socket timeout later)."""
    server.routes["/stall"] = Route(stall_after=10)
    server.routes["/fast"] = Route()
    urls = [server.url("/stall"), server.url("/fast")]
    manifest = write_manifest(tmp_path / "zoo", [entry_rec(files=[file_rec(urls)])])
    argv = ["download", "m1", "--manifest", str(manifest), "--cache-dir", str(tmp_path / "c")]
    began = time.monotonic()
    assert cli.main([*argv, "--deadline", "5"]) == 0
    assert 5 <= time.monotonic() - began < 10
    assert Path(capsys.readouterr().out.strip()).read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/stall", "/fast"]


def test_a_stalled_only_mirror_fails_at_the_deadline_of_the_environment(
    server, tmp_path, monkeypatch, capsys
):
    server.routes["/stall"] = Route(stall_after=10)
    manifest = write_manifest(
        tmp_path / "zoo", [entry_rec(files=[file_rec([server.url("/stall")])])]
    )
    monkeypatch.setenv("SOLO_DEEPFUSION_DOWNLOAD_DEADLINE", "1.5")
    argv = ["download", "m1", "--manifest", str(manifest), "--cache-dir", str(tmp_path / "c")]
    began = time.monotonic()
    assert cli.main(argv) == 1
    assert time.monotonic() - began < 4
    assert "too slow: 10 of 3145851 bytes within its deadline" in capsys.readouterr().err
    assert len(server.requests) == 1  # not retried: the deadline was spent


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_deadline_that_is_not_seconds_is_refused(tmp_path, capsys, monkeypatch, value):
    assert cli.main(["download", "m1", "--deadline", value]) == 2
    assert f"--deadline: must be a number of seconds > 0, got '{value}'" in capsys.readouterr().err
    monkeypatch.setenv("SOLO_DEEPFUSION_DOWNLOAD_DEADLINE", value)
    with pytest.raises(ValueError, match=f"SOLO_DEEPFUSION_DOWNLOAD_DEADLINE='{value}' is not"):
        hub.download("m1", manifest=tmp_path / "none.yaml")


def test_the_default_deadline_grows_with_the_file():
    from solo_deepfusion.hub.download import DEADLINE_BASE_S, MIN_RATE, deadline_for

    assert deadline_for(0) == DEADLINE_BASE_S
    assert deadline_for(100 * MIN_RATE) == DEADLINE_BASE_S + 100


def test_download_verified_and_cached(server, tmp_path):
    server.routes["/w"] = Route()
    manifest = write_manifest(tmp_path / "zoo", [entry_rec(files=[file_rec([server.url("/w")])])])

    path = hub.download("m1", manifest=manifest, progress=False)

    assert path == cache_file(tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name(path.name + ".part").exists()
    assert hub.download("m1", manifest=manifest) == path  # second call: from the cache
    assert len(server.requests) == 1


def test_resume_after_cut_connection(server, tmp_path):
    cut = 1_500_000
    server.routes["/w"] = Route(cut_after=[cut])
    path = hub.download(one_file_entry([server.url("/w")]), progress=False)

    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/w", None), ("/w", f"bytes={cut}-")]


@pytest.mark.parametrize("honour_range", [True, False])
def test_leftover_part_is_resumed_or_restarted(server, tmp_path, honour_range):
    server.routes["/w"] = Route(honour_range=honour_range)
    part = cache_file(tmp_path).with_name("backbone.safetensors.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])  # an earlier, interrupted run

    path = hub.download(one_file_entry([server.url("/w")]), progress=False)

    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/w", "bytes=1000-")]  # 200 instead of 206 → rewritten from 0
    assert not part.exists()


def test_stale_wrong_part_is_discarded_and_refetched(server, tmp_path):
    server.routes["/w"] = Route()
    part = cache_file(tmp_path).with_name("backbone.safetensors.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # not a prefix of the real file

    path = hub.download(one_file_entry([server.url("/w")]), progress=False)

    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/w", "bytes=1000-"), ("/w", None)]


def test_hash_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    server.routes["/w"] = Route(corrupt=True)
    with pytest.raises(hub.DownloadError, match="sha256 mismatch") as err:
        hub.download(one_file_entry([server.url("/w")]), progress=False)

    target = cache_file(tmp_path)
    assert not target.exists()
    assert not target.with_name(target.name + ".part").exists()
    assert err.value.failures[0][0] == server.url("/w")


def test_404_then_next_mirror(server, tmp_path):
    server.routes["/good"] = Route()
    entry = one_file_entry([server.url("/missing"), server.url("/good")])

    path = hub.download(entry, progress=False)

    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/missing", "/good"]


def test_stalled_mirror_is_skipped(server, tmp_path):
    server.routes["/stall"] = Route(cut_after=[0])  # headers, then nothing
    server.routes["/good"] = Route()
    path = hub.download(one_file_entry([server.url("/stall"), server.url("/good")]), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/stall", "/good"]


def test_hf_url_resolves_through_hf_hub_url(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    server.routes["/org/repo/resolve/0123abc/r18/backbone.safetensors"] = Route()
    entry = one_file_entry(["hf://org/repo@0123abc/r18/backbone.safetensors"])

    assert hub.download(entry, progress=False).read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/org/repo/resolve/0123abc/r18/backbone.safetensors"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_mirrors_failing_lists_each_url_and_reason(server, tmp_path):
    server.routes["/bad"] = Route(corrupt=True)
    server.routes["/short"] = Route(data=PAYLOAD[:-1])
    refused = f"http://127.0.0.1:{_closed_port()}/w"
    urls = [server.url("/missing"), refused, server.url("/bad"), server.url("/short")]

    with pytest.raises(hub.DownloadError) as err:
        hub.download(one_file_entry(urls), progress=False)

    reasons = dict(err.value.failures)
    assert list(reasons) == urls
    assert "404" in reasons[urls[0]]
    assert "connection failed" in reasons[urls[1]]
    assert "sha256 mismatch" in reasons[urls[2]]
    assert "manifest says" in reasons[urls[3]]
    for url in urls:
        assert url in str(err.value)
    assert not cache_file(tmp_path).exists()


def test_redirects_followed_but_never_to_plain_http_elsewhere(server, tmp_path):
    server.routes["/hop"] = Route(redirect=server.url("/good"))
    server.routes["/good"] = Route()
    server.routes["/evil"] = Route(redirect="http://example.invalid/w")

    assert hub.download(one_file_entry([server.url("/hop")]), progress=False).is_file()
    entry = one_file_entry([server.url("/evil")], name="m2")
    with pytest.raises(hub.DownloadError, match="refused redirect"):
        hub.download(entry, progress=False)
    assert [p for p, _ in server.requests] == ["/hop", "/good", "/evil"]


def test_non_loopback_http_url_refused_without_request(tmp_path):
    with pytest.raises(hub.DownloadError, match=r"only allowed for 127\.0\.0\.1"):
        hub.download(one_file_entry(["http://example.invalid/w"]), progress=False)


@pytest.mark.parametrize("how", ["arg", "SOLO_DEEPFUSION_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_uses_only_the_cache(server, tmp_path, monkeypatch, how):
    server.routes["/w"] = Route()
    entry = one_file_entry([server.url("/w")])
    offline = True if how == "arg" else None
    if how != "arg":
        monkeypatch.setenv(how, "1")

    with pytest.raises(hub.NotCachedError, match=r"offline.*not cached"):
        hub.download(entry, offline=offline)
    assert server.requests == []

    hub.download(entry, offline=False, progress=False)  # an explicit argument beats the env
    server.requests.clear()
    assert hub.download(entry, offline=offline).read_bytes() == PAYLOAD
    assert server.requests == []


def test_corrupted_cache_file(server, tmp_path):
    server.routes["/w"] = Route()
    entry = one_file_entry([server.url("/w")])
    path = hub.download(entry, progress=False)
    path.write_bytes(b"x" + PAYLOAD[1:])

    with pytest.raises(hub.NotCachedError, match="corrupted"):
        hub.download(entry, offline=True)
    with pytest.warns(UserWarning, match="corrupted"):
        assert hub.download(entry, progress=False).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_concurrent_downloads_fetch_once(server, tmp_path):
    server.routes["/w"] = Route()
    entry = one_file_entry([server.url("/w")])
    out: list[Path] = []
    threads = [
        threading.Thread(target=lambda: out.append(hub.download(entry, progress=False)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and all(p.read_bytes() == PAYLOAD for p in out)
    assert len(server.requests) == 1


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "..", ""])
def test_unsafe_names_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="not a safe file name"):
        hub.download(one_file_entry(["w.safetensors"], name=bad), progress=False)
    with pytest.raises(ValueError, match="not a safe file name"):
        hub.download(one_file_entry(["w.safetensors"], filename=bad), progress=False)
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "x").exists()


def test_unsafe_names_rejected_by_manifest(tmp_path):
    manifest = write_manifest(tmp_path / "zoo", [entry_rec(name="../x")])
    with pytest.raises(hub.ManifestError, match=r"field 'name'"):
        hub.load_manifest(manifest)


def test_relative_and_file_urls(tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    (zoo / "files").mkdir(parents=True)
    args = json.dumps({"method": "simclr"}).encode()
    (zoo / "files" / "args.json").write_bytes(args)
    mirror = tmp_path / "mirror" / "args.json"
    mirror.parent.mkdir()
    mirror.write_bytes(args)
    files = [
        file_rec(["files/args.json"], role="args", data=args),
        file_rec(["files/nowhere.safetensors", mirror.as_uri()], role="backbone", data=args),
    ]
    manifest = write_manifest(zoo, [entry_rec(files=files)])
    monkeypatch.chdir(tmp_path / "mirror")  # relative URLs resolve against the manifest folder

    path = hub.download("m1", role="args", manifest=manifest)
    assert path == cache_file(tmp_path, filename="args.json")
    assert path.read_bytes() == args
    assert hub.download("m1", manifest=manifest).read_bytes() == args  # via the file:// mirror

    (zoo / "files" / "args.json").write_bytes(b"[" + args[1:])  # same size, other bytes
    path.unlink()
    with pytest.raises(hub.DownloadError, match="sha256 mismatch"):
        hub.download("m1", role="args", manifest=manifest)
    assert not path.exists()


def test_verify_reports_ok_missing_corrupted(server, tmp_path):
    server.routes["/w"] = Route()
    manifest = write_manifest(
        tmp_path / "zoo",
        [
            entry_rec("m1", [file_rec([server.url("/w")])]),
            entry_rec("m2", [file_rec([server.url("/w")])]),
        ],
    )
    path = hub.download("m1", manifest=manifest, progress=False)
    assert [(r.name, r.status) for r in hub.verify(manifest=manifest)] == [
        ("m1", "ok"),
        ("m2", "missing"),
    ]

    with open(path, "r+b") as fh:  # same size, one byte changed
        fh.seek(SIZE // 2)
        fh.write(bytes([PAYLOAD[SIZE // 2] ^ 0xFF]))
    (result,) = hub.verify("m1", manifest=manifest)
    assert result.status == "corrupted" and not result.ok
    assert result.actual_sha256 != SHA and result.expected_sha256 == SHA
    assert "corrupted" in str(result)
    assert path.exists()  # reported, not deleted


# ----------------------------------------------------------------------------- weights


def test_safetensors_round_trip_and_fp16(tmp_path):
    import torch

    state = {"w": torch.randn(4, 3), "b": torch.randn(3, dtype=torch.float64), "n": torch.tensor(7)}
    path = hub.save_state_dict(state, tmp_path / "m.safetensors", {"name": "x", "epochs": 3})
    loaded = hub.load_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert hub.read_metadata(path) == {"name": "x", "epochs": "3"}

    half = hub.load_state_dict(hub.save_state_dict(state, tmp_path / "h.safetensors", half=True))
    assert half["w"].dtype == half["b"].dtype == torch.float16
    assert half["n"].dtype == torch.int64 and half["n"].item() == 7
    torch.testing.assert_close(half["w"].float(), state["w"], atol=1e-2, rtol=1e-3)

    with pytest.raises(ValueError, match="float16 range"):
        hub.save_state_dict({"x": torch.tensor([1e6])}, tmp_path / "o.safetensors", half=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.safetensors", "m.safetensors"]


def test_safetensors_files_are_reproducible(tmp_path):
    import torch

    state = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(20)}
    metadata = {f"key{i}": f"value{i}" for i in range(20)}
    paths = [hub.save_state_dict(state, tmp_path / f"{i}.safetensors", metadata) for i in range(5)]
    assert len({p.read_bytes() for p in paths}) == 1  # safetensors alone orders metadata randomly
    assert hub.read_metadata(paths[0]) == metadata
    assert hub.load_state_dict(paths[0]).keys() == state.keys()
    empty = hub.save_state_dict(state, tmp_path / "e.safetensors")
    assert hub.read_metadata(empty) == {} and hub.load_state_dict(empty).keys() == state.keys()


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth", ".bin"])
def test_pickle_formats_refused(tmp_path, suffix):
    import torch

    p = tmp_path / f"model{suffix}"
    with pytest.raises(ValueError, match="pickle"):
        hub.save_state_dict({"w": torch.zeros(1)}, p)
    assert not p.exists()
    torch.save({"w": torch.zeros(1)}, p)
    with pytest.raises(ValueError, match="pickle"):
        hub.load_state_dict(p)


def test_load_backbone_state_upcasts_to_float32(tmp_path):
    import torch

    state = {"conv.weight": torch.randn(8, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(5)}
    zoo = tmp_path / "zoo"
    path = hub.save_state_dict(state, zoo / "files" / "backbone.safetensors", half=True)
    data = path.read_bytes()
    manifest = write_manifest(
        zoo, [entry_rec(files=[file_rec(["files/backbone.safetensors"], data=data)])]
    )

    loaded, entry = hub.load_backbone_state("m1", manifest=manifest)

    assert entry.name == "m1" and entry.backbone["stem"] == "cifar"
    assert loaded["conv.weight"].dtype == torch.float32
    assert torch.equal(loaded["conv.weight"], state["conv.weight"].half().float())
    assert loaded["bn.num_batches_tracked"].dtype == torch.int64


# ----------------------------------------------------------------------------- manifest


def _set(path: str, value):
    def mutate(entry: dict) -> None:
        *keys, last = path.split(".")
        node = entry
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()

BAD_ENTRIES = [
    (_set("files.0.sha256", "abc"), "'files[0].sha256'"),
    (_set("license", _DELETE), "'license': missing required field"),
    (_set("lisence", "MIT"), "'lisence': unknown field"),
    (_set("epochs", 0), "'epochs'"),
    (_set("code_commit", 123456789), "quote it"),
    (_set("metrics.0.protocol.kind", "linear"), "'metrics[0].protocol.kind'"),
    (_set("metrics.1.protocol", {"kind": "knn"}), "'metrics[1].protocol.k'"),
    (_set("files.0.urls", ["http://example.com/w"]), "'files[0].urls[0]': plain http"),
    (_set("files.0.urls", ["hf://org/repo/w.safetensors"]), "revision required"),
    (_set("files.0.urls", ["data:text/plain,abc"]), "unsupported URL scheme 'data'"),
    (_set("files.0.urls", ["javascript:alert(1)"]), "unsupported URL scheme 'javascript'"),
    (_set("files.0.urls", ["ftp://example.com/w"]), "unsupported URL scheme 'ftp'"),
    (_set("files.0.size", 0), "'files[0].size'"),
    (_set("files.0.filename", "backbone.pt"), "'files[0].filename': a 'backbone' file"),
    (_set("recipe", "../outside.yaml"), "'recipe'"),
    (_set("backbone.kwargs", []), "'backbone.kwargs'"),
]


@pytest.mark.parametrize(("mutate", "expected"), BAD_ENTRIES)
def test_manifest_errors_name_entry_and_field(tmp_path, mutate, expected):
    good = entry_rec("ok-entry")
    bad = entry_rec("m1")
    mutate(bad)
    manifest = write_manifest(tmp_path / "zoo", [good, bad])

    with pytest.raises(hub.ManifestError) as err:
        hub.load_manifest(manifest)

    assert len(err.value.errors) == 1, err.value.errors
    assert "entry 'm1' (models[1])" in err.value.errors[0]
    assert expected in err.value.errors[0]


def test_manifest_with_aliases_is_refused_at_once(tmp_path):
    """Nested aliases expand exponentially (a 2.6 KB file took 46 s); none are read."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("\n".join(levels) + "\nschema_version: 1\nmodels: []\n")
    began = time.monotonic()
    with pytest.raises(hub.ManifestError, match=r"manifest\.yaml is not valid YAML.*aliases"):
        hub.load_manifest(manifest)
    assert time.monotonic() - began < 1.0


def test_non_utf8_manifest_names_the_file(tmp_path):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_bytes(b"schema_version: 1\nmodels: []\n# \xff\xfe\n")
    with pytest.raises(hub.ManifestError, match=rf"{re.escape(str(manifest))} is not UTF-8"):
        hub.load_manifest(manifest)


def test_manifest_duplicate_names_and_roles(tmp_path):
    twice = entry_rec("m1", [file_rec(["a.safetensors"]), file_rec(["b.safetensors"])])
    manifest = write_manifest(tmp_path / "zoo", [entry_rec("m1"), twice])
    with pytest.raises(hub.ManifestError) as err:
        hub.load_manifest(manifest)
    text = str(err.value)
    assert "duplicate name" in text and "duplicate role 'backbone'" in text


def test_manifest_loads_entries(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "zoo", [entry_rec("zeta"), entry_rec("alpha")])
    entries = hub.load_manifest(manifest)
    assert list(entries) == ["zeta", "alpha"]
    e = entries["alpha"]
    assert e.metrics[1].kind == "knn" and e.metrics[1].protocol["k"] == 200
    assert e.file("backbone").size == SIZE and e.manifest_dir == manifest.parent.resolve()
    with pytest.raises(ValueError, match="no 'full' file"):
        e.file("full")

    monkeypatch.setenv("SOLO_DEEPFUSION_ZOO_MANIFEST", str(manifest))
    assert hub.list_models() == ["alpha", "zeta"]
    with pytest.raises(hub.UnknownModelError, match="did you mean 'alpha'"):
        hub.get_entry("alpha2")

    monkeypatch.setenv("SOLO_DEEPFUSION_ZOO_MANIFEST", str(tmp_path / "nope.yaml"))
    with pytest.raises(hub.ManifestError, match="SOLO_DEEPFUSION_ZOO_MANIFEST"):
        hub.list_models()


def test_unquoted_yaml_date_is_accepted(tmp_path):
    manifest = write_manifest(tmp_path / "zoo", [entry_rec()])
    manifest.write_text(manifest.read_text().replace("'2026-01-31'", "2026-01-31"))
    assert hub.load_manifest(manifest)["m1"].date == "2026-01-31"


def test_shipped_manifest_is_valid():
    assert hub.load_manifest() is not None
    assert hub.list_models() == sorted(hub.load_manifest())


def test_import_does_not_pull_heavy_frameworks():
    code = (
        "import sys, solo_deepfusion; before = set(sys.modules); import solo_deepfusion.hub; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new & {'torch', 'solo', 'lightning', 'hydra', 'huggingface_hub'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- publishing


def test_update_manifest_replaces_in_place_and_keeps_header(tmp_path):
    manifest = write_manifest(tmp_path / "zoo", [entry_rec("a"), entry_rec("b")])
    manifest.write_text("# the zoo\n# header\n" + manifest.read_text())
    changed = entry_rec("a")
    changed["epochs"] = 99
    update_manifest(manifest, changed)
    update_manifest(manifest, entry_rec("c"))

    assert manifest.read_text().startswith("# the zoo\n# header\n")
    entries = hub.load_manifest(manifest)
    assert list(entries) == ["a", "b", "c"] and entries["a"].epochs == 99

    before = manifest.read_bytes()
    broken = entry_rec("d")
    broken["files"][0]["sha256"] = "abc"
    with pytest.raises(hub.ManifestError, match=r"entry 'd' \(models\[3\]\)"):
        update_manifest(manifest, broken)
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["manifest.yaml"]


def test_update_manifest_creates_the_file_and_file_record_measures(tmp_path):
    weights = tmp_path / "zoo" / "files" / "w.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(PAYLOAD)
    rec = publish_record(weights, "backbone", ["files/w.safetensors"])
    assert rec == file_rec(["files/w.safetensors"], filename="w.safetensors")

    manifest = update_manifest(tmp_path / "zoo" / "manifest.yaml", entry_rec(files=[rec]))
    assert hub.download("m1", manifest=manifest).read_bytes() == PAYLOAD


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out" / "f.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("two")
        raise RuntimeError
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- command line


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two_entries(server, tmp_path) -> Path:
    server.routes["/w"] = Route()
    small = entry_rec("df-small", [file_rec([server.url("/w")])])
    small["projector"] = {"name": "transformer", "preset": "small"}
    small["backbone"]["stem"] = "imagenet"
    args = b'{"method": "simclr"}'
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "args.json").write_bytes(args)
    files = [file_rec([server.url("/w")]), file_rec(["args.json"], role="args", data=args)]
    return write_manifest(tmp_path / "zoo", [entry_rec("m1", files), small])


def test_cli_list(capsys, two_entries, tmp_path):
    code, out, _ = run_cli(capsys, "list", "--manifest", two_entries)
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == [
        "NAME", "METHOD", "PROJECTOR", "BACKBONE", "DATASET", "EPOCHS", "METRICS", "SIZE"
    ]  # fmt: skip
    assert first.split()[:6] == ["m1", "simclr", "deepfusion", "resnet18/cifar", "cifar10", "10"]
    assert "online acc1=80.5, knn@200 acc1=79" in first
    assert first.endswith("3.0 MiB")  # both files
    assert second.startswith("df-small") and "transformer/small" in second
    assert "resnet18/imagenet" in second

    empty = write_manifest(tmp_path / "empty", [])
    assert run_cli(capsys, "list", "--manifest", empty) == (0, "the zoo is empty\n", "")


def test_cli_info(capsys, two_entries, server):
    code, out, _ = run_cli(capsys, "info", "m1", "--manifest", two_entries)
    assert code == 0
    doc = yaml.safe_load(out)
    assert doc["name"] == "m1" and doc["epochs"] == 10
    assert doc["metrics"][1] == {
        "name": "acc1",
        "value": 79.0,
        "protocol": {"kind": "knn", "k": 200, "temperature": 0.1},
    }
    backbone, args = doc["files"]
    assert backbone["sha256"] == SHA and backbone["urls"] == [server.url("/w")]
    assert backbone["size"] == f"{SIZE} (3.0 MiB)"
    assert args["role"] == "args" and args["urls"] == ["args.json"]

    code, out, err = run_cli(capsys, "info", "df-smal", "--manifest", two_entries)
    assert (code, out) == (1, "") and "did you mean 'df-small'" in err


def test_cli_download(capsys, two_entries, tmp_path):
    code, out, _ = run_cli(capsys, "download", "m1", "--manifest", two_entries)
    assert code == 0 and out == f"{cache_file(tmp_path)}\n"

    other = tmp_path / "other"
    code, out, _ = run_cli(
        capsys, "download", "m1", "--role", "args", "--cache-dir", other, "--manifest", two_entries
    )
    assert code == 0 and Path(out.strip()) == other / "m1" / "args.json"

    code, out, err = run_cli(capsys, "download", "df-small", "--offline", "--manifest", two_entries)
    assert (code, out) == (1, "") and "offline mode" in err and "not cached" in err
    code, _, err = run_cli(capsys, "download", "m1", "--role", "full", "--manifest", two_entries)
    assert code == 1 and "has no 'full' file" in err


def test_cli_verify(capsys, two_entries, tmp_path):
    run_cli(capsys, "download", "m1", "--manifest", two_entries)
    code, out, _ = run_cli(capsys, "verify", "--manifest", two_entries)
    assert code == 0
    assert out.splitlines() == [
        "ok         m1/backbone.safetensors (backbone)",
        "missing    m1/args.json (args)",
        "missing    df-small/backbone.safetensors (backbone)",
        "1 ok, 2 missing, 0 corrupted",
    ]

    cache_file(tmp_path).write_bytes(b"x" + PAYLOAD[1:])
    code, out, _ = run_cli(capsys, "verify", "m1", "--manifest", two_entries)
    assert code == 1
    assert out.splitlines()[0].startswith("corrupted  m1/backbone.safetensors (backbone)  sha256 ")
    assert out.splitlines()[-1] == "0 ok, 1 missing, 1 corrupted"
    assert cache_file(tmp_path).exists()  # reported, not deleted


def test_cli_export_without_solo_learn_names_the_install_hint(capsys, two_entries, monkeypatch):
    monkeypatch.setattr(cli, "host_problem", lambda: f"solo-learn is not installed. {INSTALL_HINT}")
    code, out, err = run_cli(capsys, "export", "m1", "somewhere", "--manifest", two_entries)
    assert (code, out) == (1, "")
    assert "`zoo export` needs solo-learn" in err and INSTALL_HINT in err


@pytest.mark.parametrize(
    "argv",
    [[], ["nope"], ["download"], ["download", "m1", "--role", "weights"], ["list", "--bogus"]],
)
def test_cli_usage_errors(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and "usage: solo-deepfusion zoo" in err


def test_cli_help_and_console_script(capsys, two_entries):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("list", "info", "download", "verify", "export"))
    assert top_cli.main(["zoo", "list", "--manifest", str(two_entries)]) == 0
    assert "df-small" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["download", "export"])
def test_cli_a_file_where_a_folder_belongs_is_a_usage_error(capsys, two_entries, tmp_path, command):
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("x")
    if command == "download":
        argv = ["download", "m1", "--cache-dir", str(not_a_folder)]
        option = "--cache-dir"
    else:
        argv = ["export", "m1", str(not_a_folder)]
        option = "DIR"
    code, _, err = run_cli(capsys, *argv, "--manifest", two_entries)
    assert code == 2
    assert (
        err.strip()
        == f"error: solo-deepfusion zoo: {option} {not_a_folder} is a file, not a folder"
    )


@pytest.mark.parametrize(
    "content",
    [
        b"\x80\x04\x95" + b"cos\nsystem\n" * 8,  # a pickle under a .safetensors name
        b"\xff" * 8 + b"{}",  # a header length far beyond the file
        b"",  # empty
    ],
)
def test_a_file_that_is_not_safetensors_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    for read in (hub.load_state_dict, hub.read_metadata):
        with pytest.raises(
            ValueError, match=r"w\.safetensors is not a valid safetensors file"
        ) as e:
            read(path)
        assert "\n" not in str(e.value)
