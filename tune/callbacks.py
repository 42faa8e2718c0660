"""The two callbacks of a sweep: one in each trial's Ray Train controller, one in the Tune driver."""
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from moco_ray.metrics import EVENT, KNN_TOP1, Event


class FreshMetricCallback(TuneReportCallback):
    """Rank 0's reports that carry a fresh value of the metric, and only those, become Tune results.

    Tune cannot take a report without the metric (strict metric checking fails the trial) or with it
    set to None (ASHA multiplies it), and a stale value would be recorded by ASHA at the wrong rung.
    The per-worker loop reports kNN top-1 as None until the first kNN, and repeats the last value in
    every later step report. So: the run's final report, and the epoch-end reports of the epochs at
    which the loop computes the kNN (every `knn_every` epochs), each epoch once. Their `epoch` is the
    number of completed epochs: ASHA's time attribute.
    """

    def __init__(self, metric, knn_every):
        super().__init__()
        self.metric = metric
        self.knn_every = knn_every
        self.last_epoch = 0

    def fresh(self, m):
        if m.get(self.metric) is None:
            return False
        if m.get(EVENT) == Event.END:
            return True
        if m.get(EVENT) != Event.EPOCH:
            return False
        epoch = m.get("epoch") or 0
        if epoch <= self.last_epoch:        # already sent, or redone after a restart of the workers
            return False
        return self.metric != KNN_TOP1 or bool(self.knn_every and epoch % self.knn_every == 0)

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics or not self.fresh(metrics[0]):
            return
        if metrics[0].get(EVENT) == Event.EPOCH:
            self.last_epoch = metrics[0]["epoch"]
        super().after_report(run_context, metrics, checkpoint)


class SweepProgress(Callback):
    """One line per result and per finished trial, in the sweep driver's output."""

    def __init__(self, metric):
        self.metric = metric

    def _name(self, trial):
        return f"trial {trial.trial_id} (T={trial.config.get('T'):g}, m={trial.config.get('m'):g})"

    def _value(self, result):
        v = (result or {}).get(self.metric)
        return "n/a" if v is None else f"{v:.4g}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"[sweep] {self._name(trial)} epoch {result.get('epoch')}: {self.metric} "
              f"{self._value(result)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        how = "finished" if last.get(EVENT) == Event.END else "stopped early"
        print(f"[sweep] {self._name(trial)} {how} after {last.get('epoch')} epochs: {self.metric} "
              f"{self._value(last)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[sweep] {self._name(trial)} failed; see {trial.path}", flush=True)
