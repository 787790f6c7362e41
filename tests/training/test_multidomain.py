"""The multi-domain data (mope.training.multidomain): deterministic, capped, disjoint splits, three domains.

The builds need the Debian packages fortunes, manpages and manpages-dev; without them those tests
skip, naming the packages and the install command. The roff reader and the missing-package error
are tested everywhere.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from mope.training import multidomain, stdlib_docstrings


@pytest.fixture(scope="module")
def built() -> tuple[list[dict], list[dict]]:
    missing = multidomain.missing_packages()
    if missing:
        pytest.skip(f"Debian package(s) {', '.join(missing)} not installed ({multidomain.INSTALL_COMMAND})")
    return multidomain.build(install=False)


def test_the_build_is_deterministic(built):
    assert multidomain.build(install=False) == built


def test_classes_are_capped_and_small_files_dropped(built):
    train, held_out = built
    counts = Counter(row["label"] for row in train + held_out)
    caps = {"stdlib": 160, "fortunes": multidomain.FORTUNE_CAP, "man": multidomain.MAN_CAP}
    for label, count in counts.items():
        assert count <= caps[label.split(":")[0]], label
    fortunes = {label.split(":")[1] for label in counts if label.startswith("fortunes:")}
    for name in fortunes:  # every kept file had at least MIN_FORTUNES entries; the offensive set is never read
        assert len(multidomain.fortunes_of(f"{multidomain.FORTUNE_DIR}/{name}")) >= multidomain.MIN_FORTUNES
    assert multidomain.OFFENSIVE not in fortunes
    small = {n for n in multidomain.fortune_files() if n not in fortunes}
    assert all(len(multidomain.fortunes_of(f"{multidomain.FORTUNE_DIR}/{n}")) < multidomain.MIN_FORTUNES for n in small)
    sections = {label.split(":")[1] for label in counts if label.startswith("man:")}
    assert {"2", "3", "5", "7"} <= sections  # the sections with enough pages in the Linux man-pages


def test_splits_are_disjoint_and_no_text_has_two_labels(built):
    train, held_out = built
    assert not {r["text"] for r in train} & {r["text"] for r in held_out}
    labels: dict[str, set[str]] = {}
    for row in train + held_out:
        labels.setdefault(row["text"], set()).add(row["label"])
    assert all(len(names) == 1 for names in labels.values())
    assert 0.2 < len(held_out) / (len(train) + len(held_out)) < 0.3  # the hash split's 0.25


def test_labels_span_the_three_domains_and_stdlib_is_the_demo_task(built):
    train, held_out = built
    for rows in built:
        assert {r["domain"] for r in rows} == set(multidomain.DOMAINS)
        assert all(r["label"].startswith(r["domain"] + ":") for r in rows)
    demo_train, demo_eval = stdlib_docstrings.build()
    assert [(r["text"], "stdlib:" + r["label"]) for r in demo_train] == [
        (r["text"], r["label"]) for r in train if r["domain"] == "stdlib"
    ]
    assert [r["text"] for r in demo_eval] == [r["text"] for r in held_out if r["domain"] == "stdlib"]


def test_missing_packages_are_named_with_the_install_command(monkeypatch):
    """Not root: a clear error naming the package and the command, and nothing is run."""
    monkeypatch.setattr(multidomain, "package_versions", lambda packages=(): {"fortunes": None, "manpages": "6.03-2"})
    monkeypatch.setattr(multidomain.os, "geteuid", lambda: 1000)
    ran = []
    monkeypatch.setattr(multidomain.subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(
        multidomain.MissingPackages, match=r"fortunes.*sudo apt-get update && apt-get install -y fortunes"
    ):
        multidomain.build()
    assert ran == []


def test_as_root_the_missing_packages_are_installed_once(monkeypatch):
    """apt-get update once, then apt-get install -y of exactly the missing packages."""
    monkeypatch.setattr(multidomain, "missing_packages", lambda: ["fortunes", "manpages-dev"])
    monkeypatch.setattr(multidomain.os, "geteuid", lambda: 0)
    ran = []
    monkeypatch.setattr(
        multidomain.subprocess,
        "run",
        lambda command, **k: ran.append(command) or subprocess.CompletedProcess(command, 0),
    )
    multidomain.ensure_packages()
    assert ran == [["apt-get", "update"], ["apt-get", "install", "-y", "fortunes", "manpages-dev"]]


def test_without_dpkg_every_package_is_missing(monkeypatch):
    def no_dpkg(*args, **kwargs):
        raise FileNotFoundError("dpkg-query")

    monkeypatch.setattr(multidomain.subprocess, "run", no_dpkg)
    assert multidomain.missing_packages() == list(multidomain.PACKAGES)


ROFF = r""".\" a comment
.TH open 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open, openat \- open and possibly create a file
.SH SYNOPSIS
.B #include <fcntl.h>
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
If the file does not exist, it may be created.
"""


def test_the_roff_reader_keeps_name_and_the_first_sentence():
    assert multidomain.man_text(ROFF) == (
        "open, openat - open and possibly create a file. The open() system call opens the file specified by pathname."
    )
    assert multidomain.man_text(".so man2/open.2\n") is None  # a redirection to another page
    assert multidomain.man_text(".TH x 3\n.SH DESCRIPTION\nNo name.\n") is None


def test_a_data_file_without_rows_is_refused_naming_it(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"versions": {}}))
    with pytest.raises(ValueError, match=r"data.json lacks \['eval', 'train'\]: write it with python -m"):
        multidomain.read(str(path))


def test_the_union_is_a_builtin_data_source(monkeypatch):
    from mope.training.data import read_rows
    from mope.training.recipe import DataSection, RecipeError

    monkeypatch.setattr(multidomain, "missing_packages", lambda: ["fortunes"])
    monkeypatch.setattr(multidomain.os, "geteuid", lambda: 1000)
    with pytest.raises(RecipeError, match=r"builtin:multidomain.*fortunes"):
        read_rows(DataSection(source="builtin:multidomain"))


def test_the_builtin_source_gives_each_row_its_domain_id_for_task_routing(built):
    # its domain column is a name, which a task_column refuses: data.task_column: domain_id routes by domain
    from mope.training.data import load_examples
    from mope.training.recipe import DataSection

    section = DataSection(source="builtin:multidomain", task_column="domain_id")
    examples = load_examples(section, "sequence_classification", {"domain_id": (3, "adapter.config.num_tasks")})
    rows = examples.train + examples.eval
    assert {row["domain_id"] for row in rows} == {0, 1, 2}
    assert all(multidomain.DOMAINS[row["domain_id"]] == row["domain"] for row in rows)
