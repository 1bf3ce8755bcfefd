"""Learning curves (cmvae.curves): snapshots measure what they claim, never change training, and survive a resume."""
import torch

from cmvae import train as ct
from cmvae.curves import CurveRecorder, clustering_snapshot, read_curve
from test_core import synthetic_splits, tiny_cfg
from test_pruning import redundant_mixture

torch.set_num_threads(1)


def test_snapshot_of_a_known_mixture():
    "4 groups, 10 prior components (3 redundant, 3 empty): perfect clusters before and after a selection that keeps 4."
    model, data, *_ = redundant_mixture(0)
    val, test = data.subset(torch.arange(0, 200)), data.subset(torch.arange(200, 400))
    snap = clustering_snapshot(model, val, test, beta=1.0, n_classes=4)
    assert snap['kept'] == 4
    assert snap['nmi_selected'] > 0.99 and snap['acc_selected'] > 0.99 and snap['kmeans_nmi'] > 0.99
    assert snap['used'] >= 4 and snap['nmi'] > 0.9          # before the selection, redundant components split groups
    assert bool(model.active.all())                         # the snapshot does not prune the model


def test_recording_never_changes_training_and_survives_a_resume(tmp_path):
    splits = synthetic_splits()
    splits['test'] = splits['val']
    cfg = tiny_cfg(epochs=3)
    plain, _ = ct.fit(cfg, splits, progress=False)
    rec = CurveRecorder(splits['val'], splits['test'], cfg.beta, seed=cfg.seed, path=tmp_path / 'full' / 'curve.jsonl',
                        every=1, last=cfg.epochs)
    (tmp_path / 'full').mkdir()
    recorded, _ = ct.fit(cfg, splits, out_dir=tmp_path / 'full', progress=False, on_epoch_end=rec)
    for a, b in zip(plain.state_dict().values(), recorded.state_dict().values()): assert torch.equal(a, b)
    full = read_curve(tmp_path / 'full')
    assert [r['epoch'] for r in full] == [1, 2, 3]
    # interrupted after epoch 2, resumed with a fresh recorder on the same file
    cut = tmp_path / 'cut'; cut.mkdir()
    first = CurveRecorder(splits['val'], splits['test'], cfg.beta, seed=cfg.seed, path=cut / 'curve.jsonl', last=cfg.epochs)
    ct.fit(cfg, splits, out_dir=cut, progress=False, stop_after_epoch=2, on_epoch_end=first)
    second = CurveRecorder(splits['val'], splits['test'], cfg.beta, seed=cfg.seed, path=cut / 'curve.jsonl', last=cfg.epochs)
    ct.fit(cfg, splits, out_dir=cut, progress=False, on_epoch_end=second)
    resumed = read_curve(cut)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ('seconds', 'train_seconds')} for r in rows]
    assert drop(resumed) == drop(full)
