"""`TrainingRun`: one worker's training run, everything `train_worker`'s loop needs, and what each
of its lines does (log a window, validate, test, checkpoint, finish).

The state that a checkpoint holds is `self.state` (trainer/state.py); the rest is rebuilt from the
config at every start, and the engine's tensors come from DeepSpeed's checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.contract import DatasetInfo, read_dataset
from datasets.position import DataPosition
from trainer.checkpointing import TEMP_PREFIX, FaultPoint, latest, restore, save, state_digest
from trainer.config import Config
from trainer.engine import WorkerArgs, init_engine, setup_worker
from trainer.evaluation.attention_maps import eval_overlay_files
from trainer.evaluation.evaluate import EvalResult, average_buffers, evaluate, validation_metric
from trainer.loop import LossMeter, RankZeroLog, TrainStream, check_weights_finite
from trainer.models.registry import build_model, loss_weights
from trainer.progress import Progress, format_table
from trainer.results import final_metrics, flat_eval_metrics, result_files
from trainer.schedule import BEST_MODEL_FILE, BestModel, ValidationSchedule, current_lr
from trainer.state import BadSampleTotals, StateError, Throughput, TrainState, rng_state, set_rng_state
from trainer.zero import ResumeLoad, engine_switch_error, full_state_dict, optimizer_digest, resume_load


@dataclass
class TrainingRun:
    cfg: Config
    args: WorkerArgs
    rank: int
    world: int
    device: torch.device
    info: DatasetInfo
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    schedule: ValidationSchedule  # adaptive lr, early stopping, best model (trainer/schedule.py)
    state: TrainState
    stream: TrainStream
    meter: LossMeter
    log: RankZeroLog
    progress: Progress | None
    fault: FaultPoint | None
    earlier_bad: BadSampleTotals  # the totals of the attempts before this one
    earlier_throughput: Throughput

    @classmethod
    def start(cls, args: WorkerArgs) -> "TrainingRun":
        """Build the model and engine, restore the latest checkpoint (or `--resume PATH`'s), open
        the training stream where the checkpoint left the data."""
        cfg, rank, world, device = setup_worker(args)
        info = read_dataset(cfg.data.url)
        schedule = ValidationSchedule(cfg, best_model_keeper(cfg, rank))
        with latest(fallback=args.resume_from) as found:
            load = resume_load(cfg.deepspeed.zero_stage, found.state.world_size, world) if found else None
            if found:
                check_same_engine(found.state, cfg)
            model = build_model(cfg, info.embeddings, info.seen, info.features)
            engine, optimizer = init_engine(cfg, model, world, universal=bool(load and load.universal))
            restored = found and restore(
                engine, found, load, read_files=lambda state, folder: schedule.load(state.schedule, folder)
            )
        schedule.apply_lr(optimizer)  # the checkpoint's lr, not optim.lr
        state = restored or TrainState(
            0, DataPosition([s.samples for s in info.shards(cfg.data.train_split)]), args.run_id, args.tracking_uri
        )
        check_same_shards(state.position, info, cfg)
        if restored:
            set_rng_state(state.rng)
            if rank == 0:
                print(resume_report(state, schedule, world, cfg.data.batch_size, load), flush=True)
        stream = TrainStream(cfg, info, rank, world, device, state.position, resumed=restored is not None)
        if cfg.data.ledger:
            stream.open_ledger(Path(args.out, "ledger"), state.step)
        samples_per_step = cfg.data.batch_size * world
        meter = LossMeter(cfg.train.log_every, cfg.train.max_steps, samples_per_step)
        progress = Progress(cfg.train.max_steps, samples_per_step, first_step=state.step) if rank == 0 else None
        log = RankZeroLog(rank, args.tracking_uri, args.run_id, after_step=state.step)
        fault = FaultPoint.parse(cfg.train.debug_fault, args.out, args.driver_pid)
        return cls(cfg, args, rank, world, device, info, engine, optimizer, schedule, state, stream, meter, log,
                   progress, fault, state.bad_samples, state.throughput)  # fmt: skip

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def partitioned(self) -> bool:
        """ZeRO stage 3: each rank holds 1/N of every (large enough) parameter."""
        return self.cfg.deepspeed.zero_stage == 3

    @contextlib.contextmanager
    def scoring_model(self, best: bool = False):
        """The model to score with (the best validated one if `best`), its BatchNorm statistics
        averaged over the workers first. Stages 0-2: the engine's module. Stage 3: a whole copy for
        the body, from the gathered weights (a collective), so that a rank's forward passes need no
        other rank: workers score different numbers of batches, and rank 0 draws the overlays
        alone. It costs one whole model per rank (no optimizer state) while the body runs."""
        average_buffers(self.model)
        if not self.partitioned:
            with self.schedule.best.loaded_into(self.model) if best else contextlib.nullcontext(self.model) as model:
                yield model
            return
        cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, compile=False))
        with torch.random.fork_rng(devices=[]):  # its random init draws nothing from the training's RNG
            model = build_model(cfg, self.info.embeddings, self.info.seen, self.info.features).to(self.device)
        if cfg.deepspeed.bf16:
            model.to(torch.bfloat16)  # as DeepSpeed casts the engine's weights and buffers
        if best:
            self.schedule.best.broadcast_into(model)
        else:
            model.load_state_dict(full_state_dict(self.model))
        yield model

    @property
    def seen_ids(self) -> torch.Tensor:
        return torch.as_tensor(self.info.seen, device=self.device)

    @property
    def loss_weights(self) -> dict[str, float]:
        return loss_weights(self.cfg)  # each model.name brings its own loss terms (trainer/models/registry.py)

    def log_window(self) -> None:
        row = self.meter.read(self.optimizer, self.device)  # raises at a non-finite loss
        if self.progress is not None:
            self.progress.update(self.state.step, row)
        self.log.metrics(row, self.state.step)

    def validate(self) -> None:
        """Seen labels of eval.val_split, never the test split; drives lr, early stopping, best."""
        with self.scoring_model() as model:
            metric = validation_metric(model, self.info, self.cfg, self.rank, self.world, self.device, average_bn=False)
        logged = self.schedule.observe(self.state.step, metric, self.model, self.optimizer)
        self.state.eval_history.append({"step": self.state.step, **logged, "lr": current_lr(self.optimizer)})
        self.log.print(self.schedule.report)
        self.log.metrics(logged, self.state.step)

    def evaluate(self, best: bool = False) -> EvalResult:
        with self.scoring_model(best) as model:
            return evaluate(model, self.info, self.cfg, self.rank, self.world, self.device, average_bn=False)

    def test(self) -> None:
        """`eval.test_during_training`: the test split every eval.every steps (metrics.json history)."""
        flat = flat_eval_metrics((results := self.evaluate()).settings())
        self.state.record_eval(self.state.step, flat)
        self.log.print(f"[eval @ step {self.state.step}]\n{format_table(results.settings(), self.cfg.eval.k)}")
        self.log.metrics(flat, self.state.step)

    def totals(self) -> tuple[dict, dict]:
        """Bad training samples (a collective) and throughput over every attempt of the run so far."""
        bad = self.earlier_bad.plus(self.stream.bad.summary())
        return bad, self.earlier_throughput.plus(self.progress.summary() if self.progress else None)

    def checkpoint(self, metrics: dict, extra_files: dict | None = None, totals: tuple[dict, dict] | None = None):
        """Save the engine and the TrainState (a collective); MLflow gets the steps it now holds."""
        if self.meter.losses:
            self.meter.check_finite()  # a window cut by the checkpoint: its losses are checked now
        check_weights_finite(self.model, self.state.step)
        self.stream.commit_positions(self.state.position, self.state.step)
        bad, throughput = totals or self.totals()
        self.state.bad_samples, self.state.throughput = BadSampleTotals(**bad), Throughput(**throughput)
        self.state.rng = rng_state()
        self.state.schedule = self.schedule.to_json()
        weights = full_state_dict(self.model, keep=self.rank == 0)  # a collective at stage 3
        self.state.model_digest = state_digest(weights) if self.rank == 0 else ""
        self.state.optimizer_digest = optimizer_digest(self.engine)  # a collective at stages 1-3
        self.state.world_size = self.world
        self.state.zero_stage, self.state.optimizer = self.cfg.deepspeed.zero_stage, self.cfg.optim.name
        files = {**self.schedule.files(), **(extra_files or {})}
        # MLflow gets the steps before the checkpoint that holds them is written: a run killed
        # before its commit resumes from the previous checkpoint, and the logger's floor (the last
        # logged step) keeps the steps it trains again from being logged twice; flushing after the
        # commit left a gap when the kill fell between the two.
        self.log.flush()
        save(self.engine, self.rank, self.state, metrics, files, self.fault)
        self.log.print(
            f"checkpoint at step {self.state.step}: model digest {self.state.model_digest}, "
            f"optimizer digest {self.state.optimizer_digest}"
        )

    def finish(self) -> None:
        """The final evaluation, metrics.json and the result files, in the last checkpoint."""
        step = self.state.step
        totals = bad_train, throughput = self.totals()  # training only, before the final evaluation
        with self.scoring_model() as model:
            results = evaluate(model, self.info, self.cfg, self.rank, self.world, self.device, average_bn=False)
            weights = full_state_dict(model) if self.rank == 0 else None  # model.pt (a whole copy at every stage)
            # attention overlays next to the numbers; a model without attention gives none
            overlays = eval_overlay_files(model, self.info, self.cfg, self.device) if self.rank == 0 else {}
        del model  # at stage 3 a whole copy: not two at once with the best model's
        best = self.schedule.best_on_test(step, results, lambda: self.evaluate(best=True))
        metrics = final_metrics(
            results,
            step,
            bad_samples={"train": bad_train, "eval": results.bad_samples},
            epochs_completed=self.state.position.completed_epochs,
            history=self.state.eval_history,
            throughput=throughput if self.rank == 0 else None,
            best=best,
            schedule=self.schedule.summary(self.optimizer),
        )
        best_flat = {f"best/{k}": v for k, v in flat_eval_metrics(best).items()} if best else {}
        counts = {"bad_samples/train": bad_train["count"], "bad_samples/eval": results.bad_samples["count"]}
        self.log.metrics({**flat_eval_metrics(results.settings()), **counts, **best_flat}, step)
        files = {**result_files(metrics, results, self.info, weights), **overlays}
        self.checkpoint(flat_eval_metrics(results.settings()), extra_files=files, totals=totals)
        self.stream.close()
        self.schedule.best.close()


def best_model_keeper(cfg: Config, rank: int) -> BestModel:
    """At ZeRO stage 3 the best weights live in a file in rank 0's temp folder, named for the
    worker's pid like a checkpoint's, so a killed worker's is removed by the next run's save."""
    if cfg.deepspeed.zero_stage != 3:
        return BestModel()
    folder = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-best-") if rank == 0 else None
    return BestModel(partitioned=True, file=Path(folder, BEST_MODEL_FILE) if folder else None)


def check_same_engine(state: TrainState, cfg: Config) -> None:
    """The optimizer state of a checkpoint continues only under the ZeRO stage and optimizer that
    wrote it (the driver checks the same before any cluster work: launch/preflight.py)."""
    problem = engine_switch_error(state.zero_stage, state.optimizer, cfg)
    if problem:
        raise StateError(problem)


def check_same_shards(position: DataPosition, info: DatasetInfo, cfg: Config) -> None:
    sizes = [s.samples for s in info.shards(cfg.data.train_split)]
    if position.sizes != sizes:
        raise StateError(
            f"the checkpoint was written for other {cfg.data.train_split} shards than "
            f"{cfg.data.url} lists now; resume on the same dataset"
        )


def resume_report(
    state: TrainState, schedule: ValidationSchedule, world: int, batch_size: int, load: ResumeLoad
) -> str:
    """What a restore found, for the console; says so when the global batch changed with the world."""
    lines = [
        f"resumed from step {state.step} on {world} workers: model digest {state.model_digest}, optimizer "
        f"digest {state.optimizer_digest}, data at epoch {state.position.completed_epochs} "
        f"(+{len(state.position.used)} in flight)",
        f"ZeRO stage {state.zero_stage}: {load.describe()}",
        f"resumed schedule: {json.dumps(schedule.to_json())}",
    ]
    if state.world_size and state.world_size != world:
        before = batch_size * state.world_size
        keep = f"--set data.batch_size={before // world} keeps it" if before % world == 0 else "no batch size keeps it"
        lines.append(
            f"note: the checkpoint was written on {state.world_size} workers; the global batch is now "
            f"{batch_size * world} samples per step (was {before}); {keep}"
        )
    return "\n".join(lines)
