"""The documentation holds: every relative link and anchor of every markdown file resolves, every
``python`` / ``torchrun`` command shown parses with its entry point's own parser (and its config file
loads with its ``--opts``), and the blocks marked ``<!-- test: run -->`` run on the CPU as written
(see tests/doc_blocks.py for the markers)."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from doc_blocks import (Block, anchors, broken_link, code_blocks, commands, links, markdown_files,
                        run_page, scratch_folder, shell_lines, slug)

MARKDOWN = markdown_files()
SHELL = ('bash', 'sh', 'shell', 'console')
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


# ------------------------------------------------------------------------------------ links

def test_the_slug_rules_are_githubs():
    # Headings of these pages, with the anchors GitHub gives them.
    assert slug('Pre-emption: SIGTERM and SIGINT') == 'pre-emption-sigterm-and-sigint'
    assert slug('Fault injection (for tests)') == 'fault-injection-for-tests'
    assert slug('The `timm` model interface') == 'the-timm-model-interface'
    assert slug('Demo: a web page of what the model sees') == 'demo-a-web-page-of-what-the-model-sees'
    assert slug('ImageNet-1K: cost and speed') == 'imagenet-1k-cost-and-speed'
    assert slug('[Linked](x.md) heading') == 'linked-heading'
    assert slug('snake_case and Ünïcode') == 'snake_case-and-ünïcode'


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / 'p.md'
    page.write_text('# A\n## Usage\n```bash\n# Usage (a comment, not a heading)\n```\n## Usage\n<a name="x"></a>\n')
    assert anchors(page) == {'a', 'usage', 'usage-1', 'x'}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / 'p.md').write_text('# Title\nSee [here](q.md#nowhere), [there](missing.md) and '
                                   '`[code](not-a-link.md)`, ![img](p.md#title).\n')
    (tmp_path / 'q.md').write_text('# Somewhere\n')
    page = tmp_path / 'p.md'
    cache = {}
    problems = {t: broken_link(page, t, cache) for _, t in links(page)}
    assert set(problems) == {'q.md#nowhere', 'missing.md', 'p.md#title'}
    assert problems['p.md#title'] is None
    assert 'no heading with the anchor #nowhere' in problems['q.md#nowhere'].replace(str(tmp_path), '')
    assert problems['missing.md'] == 'missing.md does not exist'


@pytest.mark.parametrize('page', MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    cache = {}
    broken = [f'{page.relative_to(ROOT)}:{line}: {target}: {why}'
              for line, target in links(page) if (why := broken_link(page, target, cache))]
    assert not broken, '\n'.join(broken)


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / 'README.md').read_text()
    assert len(readme.splitlines()) <= 300
    for page in sorted((ROOT / 'docs').glob('*.md')):
        assert f'](docs/{page.name})' in readme, f'README.md does not link docs/{page.name}'


# --------------------------------------------------------------------------------- commands

# Our entry points: how a documented command names them, and the parser each one uses.
PARSERS = {
    'main.py': 'main',
    '-m detection': 'detection.train',
    '-m segmentation': 'segmentation.train',
    'tools/benchmark.py': 'tools.benchmark',
    'tools/export.py': 'tools.export',
    'tools/predict.py': 'tools.predict',
    'tools/visualize.py': 'tools.visualize',
    'tools/gpu_check.py': 'tools.gpu_check',
    'benchmarks/gpu_check.sh': 'tools.gpu_check',   # exec python tools/gpu_check.py "$@"
    'demo/app.py': 'demo.app',
    'tests/mmref/make_mmseg_fixtures.py': 'mmref.make_mmseg_fixtures',
    '-m data.export_shapes': 'data.export_shapes',
    '-m detection.predict': 'detection.predict',
    '-m segmentation.predict': 'segmentation.predict',
}
# What documented commands run that is not ours: the environment's own tools.
NOT_OURS = {'-m pip', '-m pytest', '-m venv', '-c'}
LAUNCHERS = {'-m torch.distributed.launch', '-m torch.distributed.run'}
# Training entry points whose --cfg and --opts make a config that must load.
CONFIGURED = {'main.py', '-m detection', '-m segmentation'}


def _placeholder(value) -> bool:
    return any(mark in str(value) for mark in ('<', '...', '$'))


def _entry(argv):
    """(entry, its arguments) of a python/torchrun/bash command; entry None for commands of other
    programs, or one of NOT_OURS."""
    program, rest = os.path.basename(argv[0]), argv[1:]
    if program == 'bash' and rest and rest[0] in PARSERS:
        return rest[0], rest[1:]
    if program == 'torchrun' or (program.startswith('python') and ' '.join(rest[:2]) in LAUNCHERS):
        import torch.distributed.run as launcher
        # $NODE_RANK and the like: shell variables the reader sets; any value of theirs parses.
        rest = [re.sub(r'^\$\{?\w+\}?$', '0', token) for token in rest]
        args = launcher.get_args_parser().parse_args(rest if program == 'torchrun' else rest[2:])
        script = f'-m {args.training_script}' if args.module else args.training_script
        return script, args.training_script_args
    if not program.startswith('python') or not rest:
        return None, rest
    if rest[0] == '-c' or ' '.join(rest[:2]) in NOT_OURS:
        return '-c' if rest[0] == '-c' else ' '.join(rest[:2]), rest[2:]
    if rest[0] == '-m':
        return f'-m {rest[1]}', rest[2:]
    return rest[0], rest[1:]


def check_command(argv, where):
    """Parse a documented command with its entry point's parser; load the config it names."""
    entry, args = _entry(argv)
    if entry is None or entry in NOT_OURS:
        return None
    assert entry in PARSERS, f'{where}: {" ".join(argv)}: no parser known for {entry}; add it to PARSERS'
    module = importlib.import_module(PARSERS[entry])
    try:
        parsed = module.parse_args(args)
    except SystemExit as stop:
        pytest.fail(f'{where}: {" ".join(argv)}: the arguments do not parse (exit {stop.code})')
    for option in ('cfg', 'checkpoint'):
        value = getattr(parsed, option, None)
        if option == 'cfg' and isinstance(value, str) and not _placeholder(value):
            assert (ROOT / value).is_file(), f'{where}: {value} does not exist'
    model = getattr(parsed, 'model', None)
    if isinstance(model, str) and not _placeholder(model) and entry.startswith('tools/'):
        from models import list_models
        assert model in list_models(), f'{where}: no model {model}'
    if entry in CONFIGURED and not _placeholder(parsed.cfg) and not any(map(_placeholder, parsed.opts or [])):
        from config import load_config
        load_config(str(ROOT / parsed.cfg), parsed.opts or [])
    return entry


def shown_blocks():
    return [b for page in DOCS for b in code_blocks(page) if b.lang in SHELL]


@pytest.mark.parametrize('block', [b for b in shown_blocks() if b.marker is None], ids=lambda b: b.where)
def test_every_documented_command_parses(block):
    for argv in commands(block.text):
        check_command(argv, block.where)


def test_the_parse_check_catches_bad_commands():
    with pytest.raises(pytest.fail.Exception, match='do not parse'):
        check_command(['python', 'main.py', '--cfg', 'configs/focalnet_tiny_srf.yaml', '--batch-sise', '8'], 'x')
    with pytest.raises(AssertionError, match='does not exist'):
        check_command(['torchrun', '--nproc_per_node', '8', '-m', 'detection', '--cfg', 'configs/nope.yaml'], 'x')
    with pytest.raises(AssertionError, match='no parser known'):
        check_command(['python', 'tools/nope.py'], 'x')
    from errors import UserError
    with pytest.raises(UserError, match='TRAIN.EPOCHZ'):
        check_command(['python', '-m', 'torch.distributed.launch', '--nproc_per_node', '2', 'main.py',
                       '--cfg', 'configs/focalnet_tiny_srf.yaml', '--opts', 'TRAIN.EPOCHZ', '3'], 'x')
    assert check_command(['pip', 'install', 'x'], 'x') is None
    assert check_command(['bash', 'benchmarks/gpu_check.sh', '--cpu'], 'x') == 'benchmarks/gpu_check.sh'


def test_every_marker_is_known():
    for block in shown_blocks():
        assert block.marker in (None, 'run', 'ci') or block.marker.startswith('run by tests/'), \
            f'{block.where}: unknown marker test: {block.marker}'


def _runners(block: Block) -> str:
    """The source of the test file a ``run by`` block names, quotes and continuation lines joined,
    whitespace collapsed."""
    path = ROOT / block.marker[len('run by '):]
    assert path.is_file(), f'{block.where}: {path.relative_to(ROOT)} does not exist'
    text = re.sub(r"'\s*\n\s*'", '', path.read_text())  # 'a ' 'b' across lines, as Python joins them
    return ' '.join(re.sub(r"'\s+'", '', text).split())


def test_blocks_run_by_a_test_are_in_that_test():
    """A block marked ``run by tests/...`` is run there as written: the test file holds every
    command line of it."""
    for block in shown_blocks():
        if block.marker and block.marker.startswith('run by '):
            source = _runners(block)
            for line in shell_lines(block.text):
                line = re.sub(r'\s+#.*$', '', line)  # a trailing comment is not part of the command
                assert line in source, f'{block.where}: {block.marker[7:]} does not run: {line}'


def test_ci_blocks_are_what_ci_runs():
    """The blocks marked ``test: ci`` (the tests, the demo's environment) are run by .ci/run, each
    command line as written and in the same order."""
    ci = [' '.join(line.split()) for line in (ROOT / '.ci' / 'run').read_text().splitlines()]
    for block in shown_blocks():
        if block.marker == 'ci':
            lines = shell_lines(block.text)
            positions = []
            for line in lines:
                assert line in ci, f'{block.where}: .ci/run does not run: {line}'
                positions.append(ci.index(line))
            assert positions == sorted(positions), f'{block.where}: .ci/run runs these in another order'


# ---------------------------------------------------------------------- the commands that run

def _prepare(block: Block, folder: Path):
    """Write the small data sets a dense-task block names (the tests' synthetic COCO and ADE20K
    layouts), once per folder."""
    import numpy as np
    if '--data-path coco' in block.text and not (folder / 'coco').exists():
        from test_detection import make_split
        rng = np.random.default_rng(0)
        make_split(folder / 'coco', 'train2017', 64, rng, 1000)
        make_split(folder / 'coco', 'val2017', 24, rng, 50000)
    if '--data-path ade' in block.text and not (folder / 'ade').exists():
        from test_segmentation import make_ade
        make_ade(folder / 'ade', n_train=48, n_val=12)


def _records(run: Path):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def _succeeded(results):
    for block, proc in results:
        assert proc.returncode == 0, (f'{block.where} failed (exit {proc.returncode}):\n{block.text}\n'
                                      f'{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}')


def test_readme_cpu_commands_run_as_written(readme_run):
    """The quick start (its stated result too) and the tools on its model."""
    folder, results = readme_run
    assert len(results) >= 2
    _succeeded(results)
    run = folder / 'output' / 'focalnet_digits' / 'default'
    trained = [r for r in _records(run) if r.get('mode') != 'eval']
    assert [r['epoch'] for r in trained] == list(range(10)) and trained[-1]['acc1'] > 95, trained[-1]
    rows = (folder / 'predictions.csv').read_text().splitlines()
    assert rows[0].startswith('image,') and len(rows) == 1 + 3 * len(list((folder / 'digits/val/3').glob('*.png')))
    assert sorted(p.name for p in (folder / 'vis').glob('*.png')) == ['gating_maps.png', 'kernels.png', 'modulator.png']


@pytest.mark.parametrize('page', [p for p in DOCS[1:] if any(b.marker == 'run' for b in code_blocks(p))],
                         ids=lambda p: p.name)
def test_docs_cpu_commands_run_as_written(page, tmp_path):
    results = run_page(page, tmp_path, prepare=_prepare)
    _succeeded(results)
    if page.name == 'detection.md':
        evaluated = [r for r in _records(tmp_path / 'output' / 'mask_rcnn_focalnet_tiny_srf_1x' / 'default')
                     if 'bbox_ap' in r]
        # DETECTION.EVAL_FREQ is 1 in the documented command: every epoch is evaluated, the last is epoch 1
        assert [r['epoch'] for r in evaluated] == [0, 1]
    if page.name == 'segmentation.md':
        (last,) = _records(tmp_path / 'output' / 'upernet_focalnet_tiny_srf_160k' / 'default')
        assert last['iter'] == 10 and 'miou' in last


def test_a_failing_block_is_reported(tmp_path):
    page = tmp_path / 'p.md'
    page.write_text('<!-- test: run -->\n```bash\npython main.py --cfg configs/nope.yaml --data-path x\n'
                    'echo never\n```\n')
    ((block, proc),) = run_page(page, tmp_path / 'scratch')
    assert proc.returncode == 2 and 'never' not in proc.stdout
    assert (tmp_path / 'scratch' / 'main.py').resolve() == ROOT / 'main.py'
    assert not (tmp_path / 'scratch' / 'docs').exists()


# ------------------------------------------------------------------ the demo's own environment

def _demo_env_lines():
    """The README's commands that make .venv-demo, up to (not including) the gradio install."""
    (block,) = [b for b in code_blocks(ROOT / 'README.md') if '.venv-demo' in b.text and b.marker == 'ci']
    lines = shell_lines(block.text)
    install = next(i for i, line in enumerate(lines) if 'requirements-demo.txt' in line)
    return lines[:install]


def _python_env(tmp_path: Path, name: str, marker: str) -> Path:
    """A virtual environment without pip holding a module of its own (named ``marker``), as a user's
    environment holds packages the base interpreter lacks."""
    env = tmp_path / name
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', '--system-site-packages', str(env)], check=True)
    purelib = subprocess.run([str(env / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, f'{marker}.py').write_text('FOUND = True\n')
    return env


def _make_demo_env(folder: Path, python_bin: Path, lines):
    folder.mkdir()
    env = dict(os.environ, PATH=f'{python_bin}{os.pathsep}{os.environ["PATH"]}')
    env.pop('PYTHONPATH', None)
    subprocess.run(['bash', '-e', '-c', '\n'.join(lines)], cwd=folder, env=env, check=True, timeout=300)
    return folder / '.venv-demo' / 'bin' / 'python'


def _sees(python: Path, module: str) -> bool:
    # Found on the path, without the seconds that importing torch takes.
    code = f'import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)'
    return subprocess.run([str(python), '-c', code], capture_output=True).returncode == 0


def test_the_demo_environment_sees_the_one_it_is_made_from(tmp_path):
    """The README's .venv-demo commands, run from inside a virtual environment and from a plain
    Python: the new environment imports what the one it was made from holds (torch, and a module
    only that virtual environment has), and its pip sees torch as installed (so installing gradio
    there leaves torch alone). Without the .pth line, made inside a virtual environment, it does not:
    what --system-site-packages alone gives."""
    lines = _demo_env_lines()
    assert lines[0] == 'python -m venv --system-site-packages .venv-demo' and len(lines) == 2
    outer = _python_env(tmp_path, 'user-env', 'only_in_the_user_env')
    demo = _make_demo_env(tmp_path / 'from-venv', outer / 'bin', lines)
    assert _sees(demo, 'only_in_the_user_env') and _sees(demo, 'torch')
    pip = subprocess.run([str(demo), '-m', 'pip', 'show', 'torch'], capture_output=True, text=True)
    assert pip.returncode == 0 and 'Name: torch' in pip.stdout
    plain = _make_demo_env(tmp_path / 'from-plain', Path(sys.executable).parent, lines)
    assert _sees(plain, 'torch') and _sees(plain, 'yacs')
    # The control needs no pip of its own.
    without_pth = _make_demo_env(tmp_path / 'without-pth', outer / 'bin', [f'{lines[0]} --without-pip'])
    assert _sees(without_pth, 'torch') and not _sees(without_pth, 'only_in_the_user_env')
