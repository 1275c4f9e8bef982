"""The notebooks run, and what is committed of them shows on GitHub.

Every code cell of each notebook runs in order in one namespace, from the notebooks/ folder (as in a clone) with the
small settings (JAXDIFF_NOTEBOOK_SMALL=1), so an API change that breaks a tutorial fails the suite; the notebooks
are plain Python (no `!` or `%` lines), so nothing is skipped. The stored notebooks must hold the outputs of one
complete run with the full settings: figures, no error, and an "Open in Colab" link to themselves.
"""
import json
import pathlib
import re

import matplotlib
import numpy as np
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'
NAMES = ('quickstart', 'samplers', 'methods')
COLAB = 'https://colab.research.google.com/github/{repository}/blob/main/notebooks/{name}.ipynb'


def load(name):
    return json.loads((NOTEBOOKS / f'{name}.ipynb').read_text())


def code_cells(notebook):
    return [''.join(cell['source']) for cell in notebook['cells'] if cell['cell_type'] == 'code']


def run_notebook(name, monkeypatch):
    """Executes every code cell of notebooks/NAME.ipynb with the small settings; returns the namespace."""
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    monkeypatch.setenv('JAXDIFF_NOTEBOOK_SMALL', '1')
    monkeypatch.chdir(NOTEBOOKS)
    namespace = {'__name__': '__main__'}
    try:
        for index, source in enumerate(code_cells(load(name))):
            exec(compile(source, f'{name}.ipynb code cell {index + 1}', 'exec'), namespace)
    finally:
        plt.close('all')
    assert namespace['SMALL'] is True
    return namespace


@pytest.mark.parametrize('name', NAMES)
def test_the_stored_notebook_is_plain_python_with_its_colab_link_and_a_full_run_s_figures(name):
    notebook = load(name)
    cells = notebook['cells']
    sources = code_cells(notebook)
    shell = [line for source in sources for line in source.splitlines() if line.lstrip().startswith(('!', '%'))]
    assert not shell, f'{name}: shell/magic lines would not run under the test: {shell}'
    # the first code cell installs on Colab / uses the clone, and holds the one repository constant
    repository = re.search(r"^REPOSITORY = '([\w.-]+/[\w.-]+)'", sources[0], re.M)
    assert repository and "JAXDIFF_NOTEBOOK_SMALL" in sources[0] and "../setup.cfg" in sources[0], sources[0]
    link = COLAB.format(repository=repository.group(1), name=name)
    assert link in ''.join(cells[0]['source']), f'{name}: the first cell must link {link}'
    # the outputs of one complete run in order, with the full settings, figures included, no error
    code = [cell for cell in cells if cell['cell_type'] == 'code']
    assert [cell['execution_count'] for cell in code] == list(range(1, len(code) + 1)), name
    outputs = [output for cell in code for output in cell['outputs']]
    assert not [output for output in outputs if output['output_type'] == 'error'], name
    setup_text = ''.join(''.join(output.get('text', '')) for output in code[0]['outputs'])
    assert '(full settings)' in setup_text, f'{name}: the stored outputs are not from a full run: {setup_text!r}'
    figures = [output for output in outputs if 'image/png' in output.get('data', {})]
    assert len(figures) >= 2, f'{name}: {len(figures)} stored figures'


def test_quickstart_notebook_runs(monkeypatch, capsys):
    namespace = run_notebook('quickstart', monkeypatch)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if 'endpoint RMSE vs reference' in line}
    assert set(rows) == {'euler', 'heun', 'dpm2', 'dpmpp_2m', 'dpmpp_3m', 'ipndm'}
    # honest NFE: 6 first-order steps = 6 calls; 3 Heun/DPM-Solver-2 steps with a first-order last step = 5
    assert 'NFE  6' in rows['euler'] and 'NFE  5' in rows['heun'] and 'NFE  5' in rows['dpm2']
    errors = {name: float(line.split()[-1]) for name, line in rows.items()}
    assert all(np.isfinite(e) for e in errors.values()), errors
    # on this mixture the multistep solvers are accurate at 6 NFE while Heun's 2nd call at sigma_min hurts at 5
    assert errors['ipndm'] < 1.0 and errors['dpmpp_2m'] < 1.0 and errors['heun'] > errors['ipndm'], errors
    assert namespace['info']['nfe'] == 35
    # the trained model was sampled through --mode=sample's code with the default and an overridden sampler
    assert int(namespace['state'].step) == namespace['steps']
    assert namespace['heun_samples'].shape == namespace['fast_samples'].shape == (64, 2)
    assert np.all(np.isfinite(namespace['fast_samples']))
    assert '64 samples from checkpoint step 40 (ipndm, 6 NFE, 6 network and 0 gradient evaluations)' in out


def test_samplers_notebook_runs(monkeypatch):
    namespace = run_notebook('samplers', monkeypatch)
    rows = namespace['rows']
    solver_bench = namespace['solver_bench']
    # every fixed-grid solver that reaches NFE 5, and the adaptive one, scored against the reference
    reached = {r['solver'] for r in rows}
    assert reached == {label for label in solver_bench.SOLVERS if solver_bench.steps_for(label, 5)} | {'adaptive'}
    assert all(np.isfinite(r['rmse']) for r in rows), rows
    amed = {(r['method'], r['nfe']) for r in namespace['amed_rows']}
    assert amed == {(m, 3) for m in ('DPM-Solver-2', 'iPNDM', 'DPM-Solver++(3M)', 'AMED-Solver',
                                     'AMED-Plugin(iPNDM)')}
    assert {(r['method'], r['eta']) for r in namespace['gmm_rows']} == {(m, 1.0) for m in ('ddim', 'ortho',
                                                                                           'vub_star')}
    # every sampler on the trained digits model at the same budget of 9 denoiser calls
    entries = namespace['entries']
    assert len(entries) == 9 and {int(info['nfe']) for _, info in entries.values()} == {namespace['NFE']}
    assert all(np.all(np.isfinite(np.asarray(x0))) for x0, _ in entries.values())


def test_methods_notebook_runs(monkeypatch):
    namespace = run_notebook('methods', monkeypatch)
    # STF with the whole data set as reference is the exact posterior mean
    whole = [r for r in namespace['stf_rows'] if r['R'] == namespace['images'].shape[0]]
    assert whole and max(r['bias_sq'] for r in whole) < 1e-8, whole
    assert set(namespace['results']) == {'EDM, independent', 'EDM + AOT', 'rectified flow, independent', 'Fast-ODE'}
    assert all(np.isfinite(r['curvature']) for r in namespace['results'].values())
    # guidance with the exact log ratio at w = 1 turns the wrong model's Heun samples into the data model's
    drawn = namespace['drawn']
    np.testing.assert_allclose(drawn['guided, w = 1.0'], drawn['data model, Heun'], atol=1e-3)
    assert float(np.max(np.abs(drawn['wrong model, unguided'] - drawn['data model, Heun']))) > 0.1
    assert int(namespace['info']['gradient_evaluations']) > 0
