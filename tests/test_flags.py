"""The flags' documentation: docs/flags.md is dev/flags.py's output, and every flag of every
script (the training scripts, evaluate.py, the benchmarks) has a help sentence that --help shows
with its default."""
import dataclasses
import importlib
import importlib.util
import os
import re

import pytest

import harness as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("teacher.py", "pd_ddil.py", "lcm_ddil.py", "dmd2_ddil.py", "evaluate.py",
           "bench/results.py", "bench/gpu_check.py", "bench/kernel.py")


def load(path):
    """A file that is no package's module (bench/, dev/), loaded by its path."""
    name = path[:-3].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config(script):
    if "/" in script:
        return load(script).Config
    return importlib.import_module(script[:-3]).Config


def test_docs_flags_md_is_current():
    text = load("dev/flags.py").flags_markdown()
    with open(os.path.join(ROOT, "docs", "flags.md")) as fh:
        doc = fh.read()
    assert doc == text, "docs/flags.md is not current: run `python dev/flags.py > docs/flags.md`"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_help_sentence_shown_with_its_default(script, capsys):
    cls = config(script)
    fields = dataclasses.fields(cls)
    helps = {f.name: H.flag_info(cls, f.name).get("help", "") for f in fields}
    bad = [name for name, text in helps.items() if not text.strip() or not text.endswith(".")]
    assert not bad, f"{script}: fields without a help sentence ending with a period: {bad}"
    with pytest.raises(SystemExit) as e:
        H.parse_config(cls, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    names = [f.name if H.flag_info(cls, f.name).get("positional")
             else "--" + f.name.replace("_", "-") for f in fields]
    # each at the start of its own entry (so --w is not found in --w-min, nor in some help text)
    missing = [n for n in names if not re.search(rf"^ +{re.escape(n)}(?![\w-])", out, re.M)]
    assert not missing, f"{script} --help does not show {missing}"
    assert "(default:" in out
