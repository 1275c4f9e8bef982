"""Evaluating a trained network: N samples with config.sampling, their features, statistics and scores against a
reference set (FID / KID in Inception features, and / or digits FD / KID in a digits classifier's features).

    result = evaluate(config, workdir)      # {'fid': ..., 'kid': ..., 'digits_fd': ..., 'runs': [...], ...}

Samples come from `jaxdiff.drivers.generate` exactly as `--mode=sample` makes them (any sampler, schedule and option,
discriminator guidance, an AMED predictor) and stream batch by batch through the feature network, so N = 50k
never sits in memory as images (nor as features unless KID is asked for).

config.evaluation (FIELDS; each overridable from the command line):
  num_samples             samples per run (FID is biased by the sample size: compare at equal N; EDM uses 50,000)
  protocol                'single': one run on the sampling seed's batches 0, 1, ...; 'edm': EDM's protocol,
                          EDM_RUNS = 3 runs on disjoint noise (run r draws batches r * nb ... (r + 1) * nb - 1 of
                          the seed, as EDM's seeds 0-49999, 50000-99999, 100000-149999), the minimum FID reported
                          (EDM's README: "run the evaluation three times with different seeds and take the minimum")
  metric                  'fid' | 'digits' | 'both'
  kid                     also KID (Binkowski et al. 2018): keeps the features of the samples and of the reference
  kid_subsets, kid_subset_size    KID's subsets (jaxdiff.drivers.fid.kid)
  feature_batch_size      images per call of the Inception network
  inception_weights       pytorch-fid's pt_inception-2015-12-05-6726825d.pth or an .npz (None: the default places,
                          `jaxdiff.convert.inception.DEFAULT_LOCATIONS`)
  reference               'data': the Inception statistics of config.data's images (reference_split, all of them
                          or the first reference_num_examples), cached in WORKDIR (reference_cache); or the path
                          of an .npz with mu, sigma (EDM's cifar10-32x32.npz, pytorch-fid's; 'features' too for KID)
  reference_split, reference_num_examples, reference_cache
The digits metric's reference is fixed: the digits training set (jaxdiff.drivers.digits_metric).

One JSON line of results is appended to WORKDIR/evaluation.jsonl.
"""
import datetime
import hashlib
import json
import math
import os
import time

import jax
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff.drivers import config_check, digits_metric, fid, sampling, trained as trained_lib
from jaxdiff.core.errors import UserError
from jaxdiff.drivers.progress import Progress

PROTOCOLS = ('single', 'edm')
METRICS = ('fid', 'digits', 'both')
EDM_RUNS = 3
EDM_NUM_SAMPLES = 50_000
RESULTS_FILE = 'evaluation.jsonl'
FIELDS = dict(num_samples=EDM_NUM_SAMPLES, protocol='single', metric='fid', kid=False, kid_subsets=100,
              kid_subset_size=1000, feature_batch_size=250, inception_weights=None, reference='data',
              reference_split=None, reference_num_examples=None, reference_cache=True)
TABLE = {'num_samples': config_check.integer(2), 'protocol': config_check.choice(*PROTOCOLS),
         'metric': config_check.choice(*METRICS), 'kid': config_check.FLAG, 'kid_subsets': config_check.integer(1),
         'kid_subset_size': config_check.integer(2), 'feature_batch_size': config_check.integer(1),
         'inception_weights': config_check.ANY, 'reference': config_check.ANY, 'reference_split': config_check.ANY,
         'reference_num_examples': config_check.integer(2, optional=True), 'reference_cache': config_check.FLAG}


def settings_of(config):
    """config.evaluation (checked against TABLE) with FIELDS' defaults filled in; a bad field is one UserError line
    naming it."""
    s = config_check.section(config, 'evaluation', TABLE, FIELDS)
    if not isinstance(s['reference'], str) or not (s['reference'] == 'data' or s['reference'].endswith('.npz')):
        raise UserError(f'config.evaluation.reference={s["reference"]!r} must be \'data\' (config.data\'s images) '
                        'or the path of an .npz with mu and sigma (e.g. EDM\'s cifar10-32x32.npz)')
    return s


def wants(settings, metric):
    return settings['metric'] in (metric, 'both')


# ---------------------------------------------------------------------------------------------- references

def reference_data_config(config, settings):
    """config.data for the reference images (reference_split instead of data.split when given)."""
    fields = dict(config.data)
    if settings['reference_split'] is not None:
        fields['split'] = settings['reference_split']
    return fields


def weights_identity(weights_path):
    """What identifies the Inception weights in a cache key: the resolved file, its size and modification time."""
    from jaxdiff.convert import inception as convert_inception
    path = os.path.abspath(os.path.expanduser(weights_path)) if weights_path else convert_inception.default_path()
    stat = os.stat(path) if os.path.isfile(path) else None
    return [path, stat.st_size if stat else None, int(stat.st_mtime) if stat else None]


def reference_cache_path(workdir, data_fields, num_examples, feature_id):
    """WORKDIR/fid_reference_<digest>.npz, the digest of the data fields, example count and feature network."""
    key = json.dumps([sorted((k, repr(v)) for k, v in data_fields.items()), num_examples, feature_id],
                     sort_keys=True)
    return os.path.join(workdir, f'fid_reference_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz')


def reference_of(config, workdir, settings, feature_fn, feature_id=None):
    """((mu, sigma), features or None, description) of the FID reference set. `feature_id`: what identifies the
    feature network in the cache key (None: no cache)."""
    keep = settings['kid']
    if settings['reference'] != 'data':
        path = os.path.expanduser(settings['reference'])
        mu, sigma = fid.load_statistics(path)
        with np.load(path) as arrays:
            features = np.asarray(arrays['features'], np.float64) if 'features' in arrays.files else None
        if keep and features is None:
            raise UserError(f'config.evaluation.kid=True needs the reference features, and {path} holds only mu and '
                            'sigma: set config.evaluation.reference=data, or kid=False')
        return (mu, sigma), features, os.path.abspath(path)
    data_fields = reference_data_config(config, settings)
    try:
        source = data_lib.build(data_fields)
    except ValueError as e:
        raise UserError(f'config.evaluation.reference=data: {e}') from e
    if not hasattr(source, 'get'):
        raise UserError(f'config.evaluation.reference=data: data set {data_fields.get("name")!r} is not a finite '
                        'image set; give the path of an .npz with mu and sigma instead')
    n = settings['reference_num_examples']
    cache = (reference_cache_path(workdir, data_fields, n, feature_id)
             if settings['reference_cache'] and feature_id is not None else None)
    count = source.num_examples if n is None else min(n, source.num_examples)
    description = f'{data_fields.get("name")} {data_fields.get("split", "train")} ({count} images)'
    if cache is not None and _cache_serves(cache, keep):
        stats, features = fid.reference_statistics(feature_fn, source, settings['feature_batch_size'], n,
                                                    cache_path=cache, keep_features=keep)
        return stats, features, description
    print(f'reference: Inception statistics of {description}' + (f', cached in {cache}' if cache else ''),
          flush=True)
    batch_size = settings['feature_batch_size']
    batches = Progress.track(fid.source_batches(source, batch_size, n), 'reference',
                             total=math.ceil(count / batch_size), unit='batch', enabled=jax.process_index() == 0)
    stats, features = fid.features_and_statistics(feature_fn, batches, batch_size=batch_size, keep_features=keep)
    features = features.astype(np.float32) if features is not None else None   # as the cache keeps them
    if cache is not None and jax.process_index() == 0:
        np.savez(cache, mu=stats.mean, sigma=stats.covariance, **({'features': features} if keep else {}))
    return (stats.mean, stats.covariance), features, description


def _cache_serves(path, keep_features):
    """Whether the cached reference file exists and holds what is needed (the features too, for KID)."""
    if not os.path.isfile(path):
        return False
    with np.load(path) as arrays:
        return not keep_features or 'features' in arrays.files


# ---------------------------------------------------------------------------------------------- one run

class FIDRun:
    """Inception statistics (and, for KID, the features) of one run's samples, fed batch by batch."""

    def __init__(self, feature_fn, settings):
        self.feature_fn, self.settings = feature_fn, settings
        self.stats = fid.RunningStatistics()
        self.kept = []

    def update(self, samples):
        features = fid.batched_features(self.feature_fn, samples, self.settings['feature_batch_size'])
        self.stats.update(features)
        if self.settings['kid']:
            self.kept.append(features.astype(np.float32))   # KID's features in float32: 50k x 2048 is 400 MB

    def scores(self, reference, reference_features):
        s = self.settings
        features = np.concatenate(self.kept) if self.kept else None
        result = fid.scores(self.stats, reference, features, reference_features, num_subsets=s['kid_subsets'],
                            subset_size=s['kid_subset_size'])
        result.pop('num_samples')
        return result


class DigitsRun:
    """The digits metric of one run's samples (they are small: kept whole)."""

    def __init__(self, metric, settings):
        self.metric, self.settings = metric, settings
        self.samples = []

    def update(self, samples):
        self.samples.append(np.asarray(samples, np.float32))

    def scores(self):
        samples = np.concatenate(self.samples)
        if self.settings['kid']:
            result = self.metric.evaluate(samples, num_subsets=self.settings['kid_subsets'],
                                          subset_size=self.settings['kid_subset_size'])
        else:
            result = dict(digits_fd=self.metric.fd(samples), digits_data_fd=self.metric.data_fd,
                          digits_classifier_accuracy=self.metric.test_accuracy)
        result.pop('num_samples', None)
        return result


def digits_metric_for(config):
    """The digits metric at the data's resolution; a UserError unless the data are R x R x 1 digits images."""
    shape = tuple(config.data.shape)
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 1:
        raise UserError(f'config.evaluation.metric=digits needs digits images [R, R, 1]; config.data.shape={shape}')
    return digits_metric.get(shape[0])


# ---------------------------------------------------------------------------------------------- evaluate

def evaluate(config, workdir, mesh, *, feature_fn=None, feature_id=None, digits=None, trained=None):
    """Samples, scores and the JSON line (appended to WORKDIR/evaluation.jsonl on process 0); returns the result.

    feature_fn / feature_id: the FID feature network and what identifies it in the reference cache key (None: the
    Inception network of config.evaluation.inception_weights); digits: a DigitsMetric (None: trained here);
    trained: a `trained.Trained` (None: the EMA item of the workdir's newest readable checkpoint)."""
    settings = settings_of(config)
    start = time.perf_counter()
    sampling.check(config)   # a bad sampler option fails before anything is read
    if wants(settings, 'fid') and feature_fn is None:
        feature_fn = fid.inception_feature_fn(settings['inception_weights'])
        feature_id = ['inception'] + weights_identity(settings['inception_weights'])
    if wants(settings, 'digits') and digits is None:
        digits = digits_metric_for(config)
    reference = reference_features = description = None
    if wants(settings, 'fid'):
        reference, reference_features, description = reference_of(config, workdir, settings, feature_fn,
                                                                   feature_id)
    trained = trained or trained_lib.restore(config, workdir, mesh)
    generator = sampling.generator(config, mesh, trained.denoiser_fn)
    num_runs = EDM_RUNS if settings['protocol'] == 'edm' else 1
    n, batch_size = settings['num_samples'], config.sampling.batch_size
    num_batches = math.ceil(n / batch_size)
    progress = Progress('evaluating', total=num_runs * n, unit='samples', enabled=jax.process_index() == 0)
    runs = []
    for run in range(num_runs):
        fid_run = FIDRun(feature_fn, settings) if wants(settings, 'fid') else None
        digits_run = DigitsRun(digits, settings) if wants(settings, 'digits') else None
        for b in range(num_batches):
            count = min(batch_size, n - b * batch_size)
            samples = generator(trained.variables, count, first_batch=run * num_batches + b)
            for accumulator in (fid_run, digits_run):
                if accumulator is not None:
                    accumulator.update(samples)
            progress.update(count)
        scores = {'first_batch': run * num_batches}
        if fid_run is not None:
            scores.update(fid_run.scores(reference, reference_features))
        if digits_run is not None:
            scores.update(digits_run.scores())
        runs.append(scores)
    progress.close()
    result = summarize(runs, 'fid' if wants(settings, 'fid') else 'digits_fd')
    s = config.sampling
    result.update(
        workdir=os.path.abspath(workdir), checkpoint_step=int(trained.step), num_samples=n,
        protocol=settings['protocol'], metric=settings['metric'], sampler=s.sampler,
        schedule=s.schedule, schedule_options=_plain(s.get('schedule_options')),
        sampler_options=_plain(s.get('sampler_options')), predictor_workdir=s.get('predictor_workdir'),
        sigmas=[float(x) for x in np.asarray(generator.sigmas)], **generator.info,
        guidance=_plain(s.guidance) if generator.transform is not None else None,
        seed=int(s.seed),
        reference=description, seconds=round(time.perf_counter() - start, 1),
        time=datetime.datetime.now().isoformat(timespec='seconds'))
    if wants(settings, 'fid'):
        result['inception_weights'] = feature_id[1] if feature_id and feature_id[0] == 'inception' else None
    if jax.process_index() == 0:
        with open(os.path.join(workdir, RESULTS_FILE), 'a') as f:
            f.write(json_line(result) + '\n')
    return result


def json_line(result):
    return json.dumps(result)


def summarize(runs, key):
    """The reported scores: those of the run with the least `key` (EDM's minimum; the only run for 'single'),
    every run's scores under 'runs'."""
    best = min(runs, key=lambda r: r[key])
    result = {name: value for name, value in best.items() if name != 'first_batch'}
    if len(runs) > 1:
        result[f'{key}_runs'] = [r[key] for r in runs]
        result['runs'] = runs
    return result


def _plain(value):
    """A config section (ConfigDict / FrozenConfigDict / dict) as plain JSON-able Python."""
    if value is None:
        return None
    if hasattr(value, 'to_dict'):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
