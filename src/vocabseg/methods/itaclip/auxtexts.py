"""Auxiliary class texts (ITACLIP): read them from a file, match them to classes, or generate them with an LLM.

An auxiliary text is a short definition or a synonym of a class name. ITACLIP embeds it with the same prompt
templates as the names and mixes it into every name embedding of its class (see :mod:`vocabseg.methods.itaclip.method`).

Files, one entry per (non-background) class:

* TXT: the format ITACLIP publishes, one ``classname >=text`` line per class (``#`` lines and blank lines are
  skipped); lines without ``>=`` are plain texts taken in class order.
* JSON or YAML: a mapping ``classname -> text``, or a list of texts in class order.

Entries are matched to classes by name (the class label or any of its synonyms, case-insensitive). When some class
has no entry of its name but the file has exactly one entry per non-background class, entries are taken in class
order, as the ITACLIP code does.

The generator sends one chat request per class to an OpenAI-compatible ``/v1/chat/completions`` endpoint (a local
Ollama or vLLM server, or any hosted one), with the prompts and sampling settings of the ITACLIP paper (Llama-3
8B Instruct, temperature 0.6, top-p 0.9). It uses only the standard library and sends nothing unless called.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vocabseg.errors import UsageError

log = logging.getLogger(__name__)

#: The ITACLIP prompts (paper Fig. 4), sent as the system message; the user message is ``"<classname> >="``.
DEFINITION_PROMPT = (
    "Give a brief definition of prompted word like given example definitions: house >= a building that people, "
    "usually one family, live in; car >= a road vehicle with an engine, four wheels, and seats for a small number "
    "of people; (no more than 50 words, do not use extra words other than the definition of given word)"
)
SYNONYM_PROMPT = (
    "Provide the synonym (thesaurus) for the prompted word. If a word does not have a synonym, give the closest "
    "meaning, as in the following example definitions: house \u2265  home; car \u2265 automobile. "
    "(Please provide exactly one word.)"
)
PROMPTS = {"definition": DEFINITION_PROMPT, "synonym": SYNONYM_PROMPT}
#: Sampling settings of the ITACLIP generation scripts.
TEMPERATURE = 0.6
TOP_P = 0.9
MAX_TOKENS = 256

DEFAULT_LLM_URL = "http://127.0.0.1:11434/v1"  # a local Ollama server
DEFAULT_LLM_MODEL = "llama3"  # Ollama's tag for Llama-3-8B-Instruct, the paper's model
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
SEPARATOR = ">="


class AuxTextError(UsageError):
    """Auxiliary texts that cannot be read, matched or generated; the message says what to do."""


# --- reading and writing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuxTexts:
    """Entries ``(name or None, text)`` in file order; a ``None`` name means 'by position'."""

    entries: tuple[tuple[str | None, str], ...]
    source: str = ""

    @classmethod
    def from_any(cls, value: AuxTextsArg) -> AuxTexts:
        """A path, a mapping ``name -> text``, a list of texts, or an :class:`AuxTexts`."""
        if isinstance(value, AuxTexts):
            return value
        if isinstance(value, (str, os.PathLike)):
            return read_aux_texts(value)
        if isinstance(value, Mapping):
            return cls(_entries_from_mapping(value, "the aux-text mapping"), "mapping")
        if isinstance(value, Sequence):
            return cls(_entries_from_list(value, "the aux-text list"), "list")
        raise AuxTextError(f"aux texts must be a file path, a mapping or a list (got {type(value).__name__})")

    def for_classes(self, classes: Sequence[Sequence[str]], labels: Sequence[str] | None = None) -> list[str]:
        """One text per class; ``classes`` holds each class's names (``labels`` their display labels)."""
        labels = list(labels) if labels is not None else [names[0] for names in classes]
        by_name = {name.strip().lower(): text for name, text in self.entries if name is not None}
        texts, missing = [], []
        for label, names in zip(labels, classes, strict=True):
            keys = [label, *names]
            found = next((by_name[k.strip().lower()] for k in keys if k.strip().lower() in by_name), None)
            texts.append(found)
            if found is None:
                missing.append(label)
        if not missing:
            return texts
        where = f" in {self.source}" if self.source else ""
        if len(self.entries) == len(classes):
            if by_name:
                log.info("aux texts%s: no entry named %s; taking the %d entries in class order", where,
                         ", ".join(map(repr, missing[:5])), len(classes))
            return [text for _, text in self.entries]
        raise AuxTextError(
            f"no auxiliary text for class(es) {', '.join(map(repr, missing[:10]))}{where}: the file has "
            f"{len(self.entries)} entries for {len(classes)} classes (background excluded). Give one entry per "
            "class, named as the class ('classname >=text'), or exactly one entry per class in class order.")


AuxTextsArg = str | os.PathLike | Mapping[str, str] | Sequence[str] | AuxTexts


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _entries_from_mapping(mapping: Mapping, where: str) -> tuple[tuple[str | None, str], ...]:
    entries = []
    for name, text in mapping.items():
        if isinstance(text, (list, tuple)) and len(text) == 1:
            text = text[0]
        if not isinstance(text, (str, int, float)) or not _clean(text):
            raise AuxTextError(f"{where}: the entry for {name!r} must be a non-empty text (got {text!r})")
        entries.append((str(name).strip(), _clean(text)))
    if not entries:
        raise AuxTextError(f"{where}: no auxiliary texts")
    return tuple(entries)


def _entries_from_list(items: Sequence, where: str) -> tuple[tuple[str | None, str], ...]:
    entries: list[tuple[str | None, str]] = []
    for item in items:
        if isinstance(item, Mapping):
            entries.extend(_entries_from_mapping(item, where))
        elif isinstance(item, str) and _clean(item):
            entries.append((None, _clean(item)))
        else:
            raise AuxTextError(f"{where}: each entry must be a text or a 'name: text' pair (got {item!r})")
    if not entries:
        raise AuxTextError(f"{where}: no auxiliary texts")
    return tuple(entries)


def parse_aux_lines(lines: Iterable[str], where: str = "aux texts") -> tuple[tuple[str | None, str], ...]:
    """``classname >=text`` lines (ITACLIP's format) or plain texts; blank and ``#`` lines are skipped."""
    entries: list[tuple[str | None, str]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if SEPARATOR in line:
            name, text = line.split(SEPARATOR, 1)
            if not name.strip() or not _clean(text):
                raise AuxTextError(f"{where}, line {number}: expected 'classname >=text', got {line!r}")
            entries.append((name.strip(), _clean(text)))
        else:
            entries.append((None, _clean(line)))
    if not entries:
        raise AuxTextError(f"{where}: no auxiliary texts")
    if len({name is None for name, _ in entries}) > 1:
        raise AuxTextError(f"{where}: mixes 'classname >=text' lines with plain lines; use one form")
    return tuple(entries)


def read_aux_texts(path: str | os.PathLike) -> AuxTexts:
    """Read a TXT (``classname >=text`` lines), JSON or YAML aux-text file."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AuxTextError(f"aux-text file {path} not found; generate one with `vocabseg aux-texts` "
                           "or write one 'classname >=text' line per class")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuxTextError(f"cannot read aux-text file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        try:
            if suffix == ".json":
                data = json.loads(content)
            else:
                import yaml

                data = yaml.safe_load(content)
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
            raise AuxTextError(f"cannot parse aux-text file {path}: {exc}") from exc
        if isinstance(data, Mapping):
            return AuxTexts(_entries_from_mapping(data, str(path)), str(path))
        if isinstance(data, list):
            return AuxTexts(_entries_from_list(data, str(path)), str(path))
        raise AuxTextError(f"{path}: expected a mapping 'classname: text' or a list of texts")
    return AuxTexts(parse_aux_lines(content.splitlines(), str(path)), str(path))


def write_aux_texts(path: str | os.PathLike, pairs: Sequence[tuple[str, str]]) -> Path:
    """Write ``(classname, text)`` pairs: ``.json``/``.yaml`` as a mapping, anything else as ``name >=text`` lines."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        content = json.dumps(dict(pairs), indent=2, ensure_ascii=False) + "\n"
    elif suffix in (".yaml", ".yml"):
        import yaml

        content = yaml.safe_dump(dict(pairs), allow_unicode=True, sort_keys=False, width=1000)
    else:
        content = "".join(f"{name} {SEPARATOR}{_clean(text)}\n" for name, text in pairs)
    from vocabseg.io.outputs import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(content, encoding="utf-8")
    return path


# --- generation -------------------------------------------------------------------------------------------------

def chat_completions_url(url: str) -> str:
    """The chat endpoint of a server base URL: ``http://host:port`` or ``.../v1`` -> ``.../v1/chat/completions``."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise AuxTextError(f"LLM URL must start with http:// or https:// (got {url!r})")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def request_body(class_name: str, kind: str, model: str) -> dict:
    """The chat request of one class (the paper's prompt, temperature 0.6, top-p 0.9)."""
    if kind not in PROMPTS:
        raise AuxTextError(f"kind must be one of {', '.join(PROMPTS)} (got {kind!r})")
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": PROMPTS[kind]},
            {"role": "user", "content": f"{class_name} {SEPARATOR}"},
        ],
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "max_tokens": MAX_TOKENS,
        "stream": False,
    }


def clean_reply(reply: str, kind: str) -> str:
    """One line of text: an echoed ``>=``/``≥`` prefix, quotes and (for synonyms) everything after the first line
    and a trailing full stop are removed."""
    text = reply.strip()
    for prefix in (SEPARATOR, "\u2265", "=>", ":"):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
    if kind == "synonym":
        text = text.splitlines()[0].strip() if text else text
        text = text.strip("\"'`*").rstrip(".").strip()
    else:
        text = _clean(text).strip("\"'`")
    return text


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Open (and close) a TCP connection to the endpoint's host, so a dead address fails fast and clearly."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise AuxTextError(
            f"cannot reach the LLM endpoint {url} ({exc}). Start an OpenAI-compatible server (e.g. "
            "`ollama serve`, or vLLM) or pass its address with --llm-url.") from exc


def _post_json(url: str, body: dict, headers: Mapping[str, str], timeout: float) -> dict:
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace") if exc.fp else ""
        hint = " (check the API key variable)" if exc.code in (401, 403) else ""
        hint = hint or (" (check --llm-model: is the model available on the server?)" if exc.code == 404 else "")
        raise AuxTextError(f"the LLM endpoint {url} answered HTTP {exc.code}{hint}: {detail.strip()}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AuxTextError(
            f"cannot reach the LLM endpoint {url} ({reason}). Start an OpenAI-compatible server (e.g. "
            "`ollama serve`, or vLLM) or pass its address with --llm-url.") from exc
    try:
        return json.loads(payload)
    except json.JSONDecodeError as exc:
        raise AuxTextError(f"the LLM endpoint {url} did not answer JSON: {payload[:200]!r}") from exc


def generate_aux_texts(
    class_names: Sequence[str],
    kind: str = "definition",
    url: str = DEFAULT_LLM_URL,
    model: str = DEFAULT_LLM_MODEL,
    api_key_env: str | None = DEFAULT_API_KEY_ENV,
    timeout: float = 60.0,
    connect_timeout: float = 5.0,
    progress: Callable[[str, str], None] | None = None,
) -> list[tuple[str, str]]:
    """Ask the LLM for one definition or synonym per class name; returns ``(name, text)`` pairs in order.

    ``connect_timeout`` bounds the first connection check, ``timeout`` each request (generation can be slow on a
    CPU server). The API key, if any, is read from the environment variable ``api_key_env`` and sent as a Bearer token.
    Raises :class:`AuxTextError` when the endpoint cannot be reached or answers something unusable.
    """
    if kind not in PROMPTS:
        raise AuxTextError(f"kind must be one of {', '.join(PROMPTS)} (got {kind!r})")
    names = [n.strip() for n in class_names if n and n.strip()]
    if not names:
        raise AuxTextError("no class names to generate auxiliary texts for")
    endpoint = chat_completions_url(url)
    check_reachable(endpoint, min(timeout, connect_timeout))
    headers = {}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    pairs = []
    for name in names:
        answer = _post_json(endpoint, request_body(name, kind, model), headers, timeout)
        try:
            reply = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise AuxTextError(f"unexpected answer from {endpoint} for {name!r}: {str(answer)[:200]}") from exc
        text = clean_reply(str(reply or ""), kind)
        if not text:
            raise AuxTextError(f"the LLM returned an empty {kind} for {name!r}")
        pairs.append((name, text))
        if progress:
            progress(name, text)
    return pairs
