"""House rules that keep the code base navigable: small modules, one notebook per module, the book's method chapter,
help on every command-line option, no copy-pasted blocks. Needs no tool beyond the project's own environment."""
import configparser
import importlib
import json
import re
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / 'cmvae'
MAX_LINES = 600
# modules still over MAX_LINES, each with the work that will bring it under; remove an entry once it is done
OVER_LIMIT = {}   # module -> why it may exceed MAX_LINES (none today)


def library_modules(folder: Path = LIB) -> list:
    "The exported modules of the library (nbdev's `_modidx` and the package `__init__` aside)."
    return sorted(p for p in folder.glob('*.py') if p.name not in ('_modidx.py', '__init__.py'))


def library_notebooks() -> list:
    return sorted((ROOT / 'nbs').glob('[0-9][0-9]*.ipynb'))


def test_no_module_is_over_the_limit():
    sizes = {p.name: len(p.read_text(encoding='utf-8').splitlines()) for p in library_modules()}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in OVER_LIMIT}
    assert not long, f'modules over {MAX_LINES} lines: {long}; split them by concept, one notebook per module'
    done = [name for name in OVER_LIMIT if sizes.get(name, 0) <= MAX_LINES]
    assert not done, f'{done} are now within {MAX_LINES} lines: remove them from OVER_LIMIT'


def test_every_module_has_one_notebook_of_its_own():
    exported = {}
    for nb in library_notebooks():
        cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
        names = [m.group(1) for c in cells if c['cell_type'] == 'code'
                 for m in [re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)] if m]
        assert len(names) == 1, f'{nb.name}: expected one `#| default_exp`, found {names}'
        assert names[0] not in exported, f'{nb.name} and {exported.get(names[0])} both export cmvae.{names[0]}'
        exported[names[0]] = nb.name
    modules = {p.stem for p in library_modules()}
    assert set(exported) == modules, f'modules without a notebook: {modules - set(exported)}; notebooks without a module: {set(exported) - modules}'


def test_the_book_lists_every_library_notebook_in_order():
    from cmvae.report import method_notebooks
    toc = yaml.safe_load((ROOT / '_toc.yml').read_text())
    method = next(p for p in toc['parts'] if p['caption'].startswith('Method'))
    listed = [c['file'].rsplit('/', 1)[1] for c in method['chapters']]
    assert listed == list(method_notebooks(ROOT)) == [nb.stem for nb in library_notebooks()], \
        'the method chapter of _toc.yml must list every nbs/NN*.ipynb, in the order of their numbers'


def test_console_scripts_resolve():
    ini = configparser.ConfigParser()
    ini.read(ROOT / 'settings.ini')
    for line in ini['DEFAULT']['console_scripts'].split('\n'):
        name, target = (s.strip() for s in line.split('='))
        module, func = target.split(':')
        assert callable(getattr(importlib.import_module(module), func, None)), f'{name} -> {target} does not exist'
    assert 'readme_nb' not in ini['DEFAULT'] or (ROOT / 'nbs' / ini['DEFAULT']['readme_nb']).exists()


def _all_actions(parser):
    for action in parser._actions:
        yield action
        for sub in getattr(action, 'choices', None).values() if isinstance(getattr(action, 'choices', None), dict) else ():
            yield from _all_actions(sub)


def test_every_command_line_option_has_help():
    from cmvae import grid, report
    for parser in (grid.argument_parser(), report.argument_parser()):
        missing = [a.dest for a in _all_actions(parser) if not a.help]
        assert not missing, f'{parser.prog}: options without help text: {missing}'


# ---------------------------------------------------------------- no copy-pasted code
WINDOW = 6          # code lines a copied block has at least (as the `duplicates` tool)
THIN = 120          # blocks with fewer characters (closing brackets, short returns) are not copies


def _code_lines(path: Path) -> list:
    "(line number, text) of the lines that carry code: stripped, whitespace collapsed; blanks, comments and imports left out."
    out = []
    for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        t = re.sub(r'\s+', ' ', line.strip())
        if t and not t.startswith('#') and not re.match(r'(import|from) \S+', t): out.append((i, t))
    return out


def repeated_blocks(folder: Path) -> dict:
    "{block: places} for every run of WINDOW code lines that stands in more than one place of the library in `folder`."
    seen = {}
    for path in library_modules(folder):
        lines = _code_lines(path)
        for j in range(len(lines) - WINDOW + 1):
            block = tuple(t for _, t in lines[j:j + WINDOW])
            if sum(map(len, block)) >= THIN: seen.setdefault(block, []).append(f'{path.name}:{lines[j][0]}')
    return {b: places for b, places in seen.items() if len(places) > 1}


def test_no_copy_pasted_blocks():
    found = repeated_blocks(LIB)
    assert not found, 'the same code stands in several places (make one function serve them):\n' + \
        '\n'.join(f'{" ~ ".join(places)}: {block[0][:80]}' for block, places in list(found.items())[:10])


def test_the_copy_detector_finds_a_copy(tmp_path):
    "The check above can fail: a function copied into another module is found, at both places."
    for p in library_modules(): shutil.copy(p, tmp_path)
    text = (tmp_path / 'loop.py').read_text()
    fn = text[text.index('def check_resumable('):text.index('# %%', text.index('def check_resumable('))]
    (tmp_path / 'tables.py').write_text((tmp_path / 'tables.py').read_text() + '\n\n' + fn.replace('check_resumable', 'check_again'))
    places = {p for ps in repeated_blocks(tmp_path).values() for p in ps}
    assert any(p.startswith('loop.py:') for p in places) and any(p.startswith('tables.py:') for p in places)
