"""Three real-text classification domains in one label space, built from files a Debian system has.

The multi-domain study (issue 18, ``benchmarks/multidomain_study.py``) needs data on which one
low-rank update must serve inputs that need different functions, with no download:

- ``stdlib``: Python standard-library docstrings -> package family, exactly the demo's task
  (:func:`mope.training.stdlib_docstrings.build`: 10 families, at most 160 per family, its
  own hash split); labels ``stdlib:<family>``.
- ``fortunes``: a fortune cookie -> the fortune file it comes from (Debian package
  ``fortunes``, ``/usr/share/games/fortunes/``). Files with fewer than ``MIN_FORTUNES`` (100)
  entries are dropped, and so is the offensive set (``off/``, package ``fortunes-off``, never
  read); each file keeps at most ``FORTUNE_CAP`` (100) entries. Labels ``fortunes:<file>``.
- ``man``: a manual page's NAME line plus the first sentence of its DESCRIPTION -> its section
  (Debian packages ``manpages`` and ``manpages-dev``: only the pages those two packages own, as
  ``dpkg-query -L`` lists them, so other installed software changes nothing). The roff is read
  by a small reader here (no ``man``, no ``groff``); ``.so`` redirections are skipped. Sections
  with fewer than ``MIN_PAGES`` (25) pages are dropped; each keeps at most ``MAN_CAP`` (160).
  Labels ``man:<section>``.

Every text is whitespace-normalised and cut to 300 characters (as the docstrings are). A text
that occurs under two labels is dropped. Which texts a capped class keeps, and the split, are
fixed by SHA-1 hashes of the text (the stdlib task's rule, :func:`stdlib_docstrings.is_eval`):
a text is held out when its hash bucket is below ``eval_fraction`` (0.25), so the split never
depends on file order, Python's hash seed or the machine. Every row is
``{"text", "label", "domain"}``; the model is only given the text, ``domain`` is for routing by
task id and for per-domain accuracy.

Sizes on Debian 12 (fortunes 1:1.99.1-7.3, manpages 6.03-2, Python 3.11) are in
docs/when_to_use_a_mixture.md; :func:`describe` prints them for any machine. The Debian
packages are installed by :func:`ensure_packages` when missing (as root: ``apt-get update``
once, then ``apt-get install -y``), else it says how; :func:`package_versions` records their
versions with the data. Run ``python -m mope.training.multidomain --out FILE`` to write the
union to a JSON file (with the versions), e.g. for a machine that lacks the packages.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable

from . import stdlib_docstrings

DOMAINS: tuple[str, ...] = ("stdlib", "fortunes", "man")  # a row's domain id is its index here
PACKAGES: tuple[str, ...] = ("fortunes", "manpages", "manpages-dev")
INSTALL_COMMAND = "apt-get update && apt-get install -y " + " ".join(PACKAGES)

FORTUNE_DIR = "/usr/share/games/fortunes"
OFFENSIVE = "off"  # the fortunes-off set lives in this subfolder; it is never read
MIN_FORTUNES = 100
FORTUNE_CAP = 100
MAN_PACKAGES: tuple[str, ...] = ("manpages", "manpages-dev")
MIN_PAGES = 25
MAN_CAP = 160
MAX_CHARS = 300
EVAL_FRACTION = 0.25

Rows = list[dict[str, str]]


class MissingPackages(RuntimeError):
    """The Debian packages the data comes from are not installed (and could not be installed here)."""


def normalise(text: str) -> str:
    return " ".join(text.split())[:MAX_CHARS]


def capped(texts: Iterable[str], cap: int) -> list[str]:
    """At most ``cap`` texts, picked by a hash of each text (fixed, order-free)."""
    return sorted(texts, key=lambda t: hashlib.sha1(b"pick:" + t.encode()).hexdigest())[:cap]


# --- fortunes -------------------------------------------------------------------------------------


def fortune_files(folder: str = FORTUNE_DIR) -> list[str]:
    """The fortune files of ``folder``: plain files with no extension (``.dat`` indexes and ``.u8`` links skipped)."""
    return sorted(
        name
        for name in os.listdir(folder)
        if "." not in name
        and name != OFFENSIVE
        and os.path.isfile(os.path.join(folder, name))
        and not os.path.islink(os.path.join(folder, name))
    )


def fortunes_of(path: str) -> list[str]:
    """The entries of one fortune file (separated by lines holding only ``%``), normalised, empty ones dropped."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        entries = re.split(r"^%\s*$", handle.read(), flags=re.MULTILINE)
    return [text for text in (normalise(entry) for entry in entries) if text]


def fortune_classes(folder: str = FORTUNE_DIR) -> dict[str, list[str]]:
    classes = {name: fortunes_of(os.path.join(folder, name)) for name in fortune_files(folder)}
    return {name: texts for name, texts in classes.items() if len(texts) >= MIN_FORTUNES}


# --- man pages ------------------------------------------------------------------------------------

# roff escapes seen in the Linux man-pages: named glyphs, fonts, and the few one-character escapes
GLYPHS = {"aq": "'", "dq": '"', "em": "--", "en": "-", "ti": "~", "ha": "^", "lq": '"', "rq": '"', "bu": "*"}
ESCAPE = re.compile(r"\\(\(..|\[[^\]]*\]|f(?:\(..|\[[^\]]*\]|.)|\*(?:\(..|\[[^\]]*\]|.)|.)")
FONT_MACROS = re.compile(r"^\.(B|I|BR|BI|IB|IR|RB|RI|SM|SB)\b\s*(.*)$")
SECTION_DIR = re.compile(r"^/usr/share/man/man(?P<section>\d)/[^/]+\.\d\w*\.gz$")


def unescape(text: str) -> str:
    """Plain text of one roff line: glyphs named, fonts and zero-width escapes dropped."""

    def replace(match: re.Match) -> str:
        escape = match.group(1)
        if escape.startswith(("(", "[")):
            return GLYPHS.get(escape[1:].rstrip("]"), "")
        if escape[0] in "f*":
            return ""
        return {"-": "-", "e": "\\", " ": " ", "~": " ", "&": "", "c": "", "%": "", "|": "", "^": ""}.get(escape, "")

    return ESCAPE.sub(replace, text)


def macro_text(line: str) -> str:
    """The words of a font macro (``.BR open (2)`` -> ``open(2)``); alternating-font macros join their arguments."""
    match = FONT_MACROS.match(line)
    if match is None:
        return ""
    args = re.findall(r'"([^"]*)"|(\S+)', match.group(2))
    words = [quoted or bare for quoted, bare in args]
    return ("" if len(match.group(1)) == 2 else " ").join(words)


def sections_of(roff: str) -> dict[str, str]:
    """The text of each ``.SH`` section of a man page (requests dropped, font macros kept as text)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in roff.splitlines():
        if line.startswith((".SH", ".Sh")):
            current = sections.setdefault(unescape(line[3:]).strip().strip('"').upper(), [])
        elif current is None or line.startswith(("'", '.\\"')):
            continue
        elif line.startswith("."):
            current.append(unescape(macro_text(line)))
        else:
            current.append(unescape(line))
    return {name: " ".join(" ".join(lines).split()) for name, lines in sections.items()}


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(?:\s|$)", text)
    return match.group(1) if match else text


def man_text(roff: str) -> str | None:
    """``NAME`` plus the first sentence of ``DESCRIPTION``; None for a ``.so`` redirect or a page with no NAME."""
    if re.search(r"^\.so\s", roff, flags=re.MULTILINE) and ".SH" not in roff:
        return None
    sections = sections_of(roff)
    if not sections.get("NAME"):
        return None
    description = sections.get("DESCRIPTION", "")
    return normalise(f"{sections['NAME']}. {first_sentence(description)}" if description else sections["NAME"])


def package_files(packages: Iterable[str]) -> list[str]:
    """Files the Debian ``packages`` own (``dpkg-query -L``), sorted."""
    done = subprocess.run(["dpkg-query", "-L", *packages], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MissingPackages(f"dpkg-query -L {' '.join(packages)} failed: {done.stderr.strip()}")
    return sorted(set(done.stdout.split("\n")) - {""})


def man_classes(files: Iterable[str]) -> dict[str, list[str]]:
    """Section -> page texts of the man pages among ``files`` (links and redirections skipped)."""
    classes: dict[str, list[str]] = defaultdict(list)
    for path in files:
        match = SECTION_DIR.match(path)
        if match is None or os.path.islink(path) or not os.path.isfile(path):
            continue
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            text = man_text(handle.read())
        if text:
            classes[match["section"]].append(text)
    return {section: texts for section, texts in sorted(classes.items()) if len(texts) >= MIN_PAGES}


# --- packages -------------------------------------------------------------------------------------


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each Debian package (None: not installed), as ``dpkg-query`` reports it."""
    versions: dict[str, str | None] = {}
    for package in packages:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        status, _, version = done.stdout.partition(" ")
        versions[package] = version if done.returncode == 0 and status == "installed" else None
    return versions


def missing_packages() -> list[str]:
    """The packages of ``PACKAGES`` that are not installed (all of them where there is no dpkg)."""
    try:
        return [package for package, version in package_versions().items() if version is None]
    except FileNotFoundError:  # no dpkg-query: not a Debian system
        return list(PACKAGES)


def ensure_packages(install: bool = True) -> None:
    """Install the missing Debian packages (as root, ``install=True``), else raise saying how.

    ``apt-get update`` runs once, before the one ``apt-get install -y``.
    """
    missing = missing_packages()
    if not missing:
        return
    command = "apt-get update && apt-get install -y " + " ".join(missing)
    if not install or os.geteuid() != 0:
        raise MissingPackages(
            f"the multi-domain data needs the Debian package(s) {', '.join(missing)}, which are not installed: "
            f"run `sudo {command}` (or, as root, build the data again: it installs them)"
        )
    for step in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise MissingPackages(f"`{' '.join(step)}` failed ({done.stderr.strip()[-500:]}); run `{command}` by hand")


# --- the union ------------------------------------------------------------------------------------


def split(domain: str, classes: dict[str, list[str]], cap: int, eval_fraction: float) -> tuple[Rows, Rows]:
    """Rows of one domain: texts under two labels dropped, each class capped, held out by the text's hash."""
    owners = Counter(text for texts in classes.values() for text in set(texts))
    train, held_out = [], []
    for name, texts in classes.items():
        for text in capped({t for t in texts if owners[t] == 1}, cap):
            row = {"text": text, "label": f"{domain}:{name}", "domain": domain}
            (held_out if stdlib_docstrings.is_eval(text, eval_fraction) else train).append(row)
    return train, held_out


def build(eval_fraction: float = EVAL_FRACTION, install: bool = True) -> tuple[Rows, Rows]:
    """``(train, eval)`` rows ``{"text", "label", "domain"}`` of the three domains, in domain order.

    Installs the Debian packages first when they are missing and this process is root
    (``install=True``); otherwise raises :class:`MissingPackages` naming them and the command.
    """
    ensure_packages(install)
    stdlib = [
        [{"text": r["text"], "label": f"stdlib:{r['label']}", "domain": "stdlib"} for r in rows]
        for rows in stdlib_docstrings.build(eval_fraction=eval_fraction)
    ]
    fortunes = split("fortunes", fortune_classes(), FORTUNE_CAP, eval_fraction)
    man = split("man", man_classes(package_files(MAN_PACKAGES)), MAN_CAP, eval_fraction)
    return [*stdlib[0], *fortunes[0], *man[0]], [*stdlib[1], *fortunes[1], *man[1]]


def describe(train: Rows, held_out: Rows) -> dict[str, dict[str, int]]:
    """Per domain: classes, train and eval examples."""
    return {
        domain: {
            "classes": len({r["label"] for r in train + held_out if r["domain"] == domain}),
            "train": sum(r["domain"] == domain for r in train),
            "eval": sum(r["domain"] == domain for r in held_out),
        }
        for domain in DOMAINS
    }


def write(path: str, eval_fraction: float = EVAL_FRACTION) -> dict:
    """Build the union and write it, with the package and Python versions, as one JSON file."""
    train, held_out = build(eval_fraction)
    data = {
        "versions": {**package_versions(), "python": sys.version.split()[0]},
        "sizes": describe(train, held_out),
        "train": train,
        "eval": held_out,
    }
    with open(path, "w") as handle:
        json.dump(data, handle)
    return data


def read(path: str) -> dict:
    """A file :func:`write` wrote: ``{"versions", "sizes", "train", "eval"}``."""
    with open(path) as handle:
        data = json.load(handle)
    missing = sorted({"versions", "train", "eval"} - set(data))
    if missing:
        raise ValueError(f"multi-domain data file {path} lacks {missing}: write it with python -m {__name__} --out")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the union (and versions) to this JSON file")
    args = parser.parse_args()
    if args.out:
        data = write(args.out)
    else:
        train, held_out = build()
        data = {"versions": package_versions(), "sizes": describe(train, held_out)}
    print(json.dumps({"versions": data["versions"], "sizes": data["sizes"]}, indent=1))


if __name__ == "__main__":
    main()
