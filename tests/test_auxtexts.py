"""Auxiliary texts: file formats, matching to classes, and the LLM generator against a fake local server."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from vocabseg.cli import main
from vocabseg.methods.itaclip import auxtexts
from vocabseg.methods.itaclip.auxtexts import (
    AuxTextError,
    AuxTexts,
    generate_aux_texts,
    read_aux_texts,
    write_aux_texts,
)

PUBLISHED = """\
aeroplane >=a powered, fixed-wing aircraft that is used for flight.
bicycle >=a vehicle with two wheels, powered by pedaling.
ship >=a large vessel that travels on water.
"""


# --- files ------------------------------------------------------------------------------------------------------

def test_reads_the_published_line_format(tmp_path):
    file = tmp_path / "voc_definitions.txt"
    file.write_text("# generated\n\n" + PUBLISHED)
    aux = read_aux_texts(file)
    assert aux.entries[0] == ("aeroplane", "a powered, fixed-wing aircraft that is used for flight.")
    assert [name for name, _ in aux.entries] == ["aeroplane", "bicycle", "ship"]
    # Matched by label or by any synonym, case-insensitively, whatever the order.
    texts = aux.for_classes([("boat", "ship"), ("Aeroplane",), ("bicycle",)], ["boat", "aeroplane", "bicycle"])
    assert texts == ["a large vessel that travels on water.", aux.entries[0][1], aux.entries[1][1]]


def test_plain_lines_json_and_yaml(tmp_path):
    (tmp_path / "plain.txt").write_text("a feline pet\n  a canine pet  \n")
    assert read_aux_texts(tmp_path / "plain.txt").for_classes([("cat",), ("dog",)]) == ["a feline pet",
                                                                                       "a canine pet"]
    (tmp_path / "a.json").write_text(json.dumps({"dog": "a canine pet", "cat": "a feline pet"}))
    assert read_aux_texts(tmp_path / "a.json").for_classes([("cat",), ("dog",)]) == ["a feline pet", "a canine pet"]
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]))
    assert read_aux_texts(tmp_path / "b.json").for_classes([("cat",), ("dog",)]) == ["x", "y"]
    (tmp_path / "c.yaml").write_text("cat: a feline pet\ndog: |\n  a canine\n  pet\n")
    assert read_aux_texts(tmp_path / "c.yaml").for_classes([("cat",), ("dog",)]) == ["a feline pet", "a canine pet"]
    (tmp_path / "d.yml").write_text("- feline\n- canine\n")
    assert read_aux_texts(tmp_path / "d.yml").for_classes([("cat",), ("dog",)]) == ["feline", "canine"]


def test_positional_fallback_and_clear_errors(tmp_path):
    aux = AuxTexts.from_any({"kitty": "a feline", "puppy": "a canine"})
    # No entry named like the classes, but one entry per class: taken in order (the ITACLIP code does this).
    assert aux.for_classes([("cat",), ("dog",)]) == ["a feline", "a canine"]
    with pytest.raises(AuxTextError, match="no auxiliary text for class"):
        aux.for_classes([("cat",), ("dog",), ("cow",)])
    with pytest.raises(AuxTextError, match="not found"):
        read_aux_texts(tmp_path / "missing.txt")
    (tmp_path / "mixed.txt").write_text("cat >=a feline\na canine\n")
    with pytest.raises(AuxTextError, match="mixes"):
        read_aux_texts(tmp_path / "mixed.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(AuxTextError, match="no auxiliary texts"):
        read_aux_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(AuxTextError, match="cannot parse"):
        read_aux_texts(tmp_path / "bad.json")
    with pytest.raises(AuxTextError, match="non-empty text"):
        AuxTexts.from_any({"cat": ""})


@pytest.mark.parametrize("suffix", [".txt", ".json", ".yaml"])
def test_write_read_round_trip(tmp_path, suffix):
    pairs = [("cat", "a small feline, often kept as a pet"), ("traffic light", "a signal: red, amber >= green")]
    path = write_aux_texts(tmp_path / f"aux{suffix}", pairs)
    assert list(read_aux_texts(path).entries) == pairs
    if suffix == ".txt":
        assert path.read_text().splitlines()[0] == "cat >=a small feline, often kept as a pet"


# --- generator --------------------------------------------------------------------------------------------------

class FakeLLM:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that records requests and answers from a script."""

    def __init__(self, replies=None, status=200, raw=None):
        self.requests = []
        self.replies = list(replies or [])
        self.status = status
        self.raw = raw
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                if fake.raw is not None:
                    payload = fake.raw
                else:
                    reply = fake.replies.pop(0) if fake.replies else "something"
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_definitions_follow_the_paper_prompt_and_sampling(monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sk-test")
    replies = [" a small domesticated feline that purrs.\n", ">= a loyal canine companion"]
    with FakeLLM(replies) as llm:
        pairs = generate_aux_texts(["cat", "dog"], "definition", url=llm.url, model="llama3-8b-instruct",
                                   api_key_env="MY_LLM_KEY")
    assert pairs == [("cat", "a small domesticated feline that purrs."), ("dog", "a loyal canine companion")]
    assert [r["path"] for r in llm.requests] == ["/v1/chat/completions"] * 2
    body = llm.requests[0]["body"]
    assert body["model"] == "llama3-8b-instruct"
    assert body["temperature"] == 0.6 and body["top_p"] == 0.9
    system, user = body["messages"]
    assert system == {"role": "system", "content": auxtexts.DEFINITION_PROMPT}
    assert "brief definition" in system["content"] and "no more than 50 words" in system["content"]
    assert "house >= a building that people, usually one family, live in" in system["content"]
    assert user == {"role": "user", "content": "cat >="}
    assert llm.requests[1]["body"]["messages"][1]["content"] == "dog >="
    assert llm.requests[0]["headers"]["Authorization"] == "Bearer sk-test"


def test_synonyms_and_no_key_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLM(["Feline.\nIt means a cat.", '"automobile"']) as llm:
        pairs = generate_aux_texts(["cat", "car"], "synonym", url=llm.url + "/v1/", model="m")
    assert pairs == [("cat", "Feline"), ("car", "automobile")]
    system = llm.requests[0]["body"]["messages"][0]["content"]
    assert system == auxtexts.SYNONYM_PROMPT and "exactly one word" in system
    assert "Authorization" not in llm.requests[0]["headers"]


def test_unreachable_endpoint_fails_fast_and_clearly(monkeypatch):
    def no_request(*args, **kwargs):
        raise AssertionError("a request was sent although the endpoint is unreachable")

    monkeypatch.setattr(auxtexts, "_post_json", no_request)  # the connection check fails first
    with pytest.raises(AuxTextError, match="cannot reach the LLM endpoint") as info:
        generate_aux_texts(["cat"], url=f"http://127.0.0.1:{closed_port()}", timeout=3)
    assert "--llm-url" in str(info.value)


@pytest.mark.parametrize("status, match", [(401, "API key"), (404, "llm-model"), (500, "HTTP 500")])
def test_http_errors_are_explained(status, match):
    with FakeLLM(raw=b'{"error": "nope"}', status=status) as llm, pytest.raises(AuxTextError, match=match):
        generate_aux_texts(["cat"], url=llm.url)


def test_malformed_answers_are_reported():
    with FakeLLM(raw=b"<html>not json</html>") as llm, pytest.raises(AuxTextError, match="did not answer JSON"):
        generate_aux_texts(["cat"], url=llm.url)
    with FakeLLM(raw=b'{"choices": []}') as llm, pytest.raises(AuxTextError, match="unexpected answer"):
        generate_aux_texts(["cat"], url=llm.url)
    with FakeLLM([" "]) as llm, pytest.raises(AuxTextError, match="empty"):
        generate_aux_texts(["cat"], url=llm.url)
    with pytest.raises(AuxTextError, match="kind"):
        generate_aux_texts(["cat"], kind="poem")


def test_chat_completions_url():
    assert auxtexts.chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert auxtexts.chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert auxtexts.chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(AuxTextError, match="http"):
        auxtexts.chat_completions_url("h:1")


# --- CLI --------------------------------------------------------------------------------------------------------

def test_cli_aux_texts_writes_the_published_format(tmp_path, caplog):
    out = tmp_path / "aux.txt"
    with FakeLLM(["a feline", "a canine"]) as llm:
        assert main(["aux-texts", "--classes", "cat,dog|puppy", "--kind", "definition", "--out", str(out),
                     "--llm-url", llm.url, "--llm-model", "tiny"]) == 0
    assert out.read_text() == "cat >=a feline\ndog >=a canine\n"
    assert [r["body"]["messages"][1]["content"] for r in llm.requests] == ["cat >=", "dog >="]
    assert main(["aux-texts", "--classes", "cat", "--out", str(out), "--llm-url", llm.url]) == 2
    assert "--force" in caplog.text
    # Benchmark classes: the first ITACLIP name of each non-background class.
    with FakeLLM() as llm:
        assert main(["aux-texts", "--dataset", "voc21", "--kind", "synonym", "--out", str(tmp_path / "voc.json"),
                     "--llm-url", llm.url]) == 0
    users = [r["body"]["messages"][1]["content"] for r in llm.requests]
    assert len(users) == 20 and users[3] == "ship >=" and users[-1] == "television monitor >="
    assert len(json.loads((tmp_path / "voc.json").read_text())) == 20


def test_cli_aux_texts_unreachable_endpoint(tmp_path, caplog):
    code = main(["aux-texts", "--classes", "cat", "--out", str(tmp_path / "a.txt"),
                 "--llm-url", f"http://127.0.0.1:{closed_port()}"])
    assert code == 2 and "cannot reach the LLM endpoint" in caplog.text
    assert not (tmp_path / "a.txt").exists()


def test_cli_segment_with_aux_texts(tmp_path, tiny_model, chelsea, monkeypatch):
    from PIL import Image

    from vocabseg.models.openclip import from_open_clip

    monkeypatch.setattr("vocabseg.api.load_model", lambda kind, *args, **kwargs: from_open_clip(tiny_model, "tiny"))
    Image.fromarray(chelsea[:96, :128]).save(tmp_path / "cat.png")
    aux = tmp_path / "aux.txt"
    aux.write_text("cat >=a small domesticated feline\nsofa >=a long upholstered seat\n")
    code = main(["segment", str(tmp_path / "cat.png"), "--classes", "cat,sofa", "--out", str(tmp_path / "out"),
                 "--method", "itaclip", "--aux-texts", str(aux), "--device", "cpu", "--short-side", "64",
                 "--crop", "64", "--stride", "32", "--no-pamr", "--no-text-cache",
                 "--option", "intermediate_layers=1,2", "--option", "aux_coefficient=0.1"])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "cat.json").read_text())
    assert meta["method"] == "itaclip" and meta["method_options"]["aux_texts"] == str(aux)
    assert meta["method_options"]["aux_coefficient"] == 0.1
    assert meta["method_options"]["intermediate_layers"] == [1, 2]
    labels = np.asarray(Image.open(tmp_path / "out" / "cat.png"))
    assert labels.shape == (96, 128)
    # The same flag with a method that takes no aux texts is a clear error.
    code = main(["segment", str(tmp_path / "cat.png"), "--classes", "cat", "--out", str(tmp_path / "out2"),
                 "--method", "sclip", "--aux-texts", str(aux), "--device", "cpu"])
    assert code == 2
