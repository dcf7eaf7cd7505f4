"""``medmae fit`` / ``medmae validate``: LightningCLI over MAEPretrainModule + CacheDataModule.

Launch::

    medmae fit --config configs/pretrain/vit_base_gray_224.yaml
    medmae fit --config configs/pretrain/tiny_cpu.yaml --data.cache_dir /data/cache --trainer.max_steps 100
    # several GPUs / nodes: set trainer.devices / trainer.num_nodes (strategy ddp); under SLURM use srun
    medmae fit --config configs/pretrain/vit_base_gray_224.yaml --ckpt_path last   # resume the newest run

Configuration mistakes (an unknown key, an image size that is not a multiple of the patch, a model
whose ``in_chans`` differs from the channels the data yields, a cache that is missing or yields no
training slice, ``trainer.max_steps < -1``) stop before training with a one-line message that names
the field or file.

``--ckpt_path last`` resumes from the newest ``last*.ckpt`` of this run's checkpoint folders (the
``ModelCheckpoint`` ``dirpath``, or ``<logger save_dir>/<name>/version_*/checkpoints``) and reuses that
logger version, so TensorBoard curves and new checkpoints continue in the same folder. Without any
checkpoint it says so in one line and starts from step 0 (so the same command starts and resumes).
``finetune-seg`` and ``finetune-cls`` resolve it with the same :func:`resolve_last_checkpoint`.

Old flat keys (before issue 19: ``data.crop_scale``, ``--data.min_size``...) still load: the parser
moves them to their section (``data.crop.crop_scale``) before jsonargparse reads the config, with one
line per key on stderr (``medmae fit: warning: data.crop_scale is deprecated: use data.crop.crop_scale``).
``--print_config`` then prints the config in the new layout. The tables are :data:`LEGACY_TABLES`.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace, get_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from medmae.data import CacheDataModule
from medmae.data.options import LEGACY_KEYS as DATA_LEGACY_KEYS
from medmae.data.options import migrate_legacy
from medmae.train.module import MAEPretrainModule

#: errors a data or model check raises that are the user's configuration, not a bug
CONFIG_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError)

#: per config section, its old flat keys -> new dotted key under the section (issue 19), moved before parsing
LEGACY_TABLES: list[tuple[str, Mapping[str, str]]] = [
    ("data", DATA_LEGACY_KEYS),
    ("model", MAEPretrainModule.LEGACY_KEYS),  # model side of issue 19: medmae.train.options.LEGACY_KEYS
]

#: LightningCLI subcommands: a config given to the main parser nests the sections under one of them
_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def migrate_config(
    config: Mapping[str, Any], tables: Sequence[tuple[str, Mapping[str, str]]], warn: Any
) -> dict[str, Any]:
    """``config`` with the old flat keys of every ``(section, table)`` moved into place (also under a
    subcommand key); ``warn(message)`` once per moved key (:func:`medmae.data.options.migrate_legacy`)."""
    out = dict(config)
    for section, table in tables:
        if isinstance(out.get(section), Mapping):
            out[section] = migrate_legacy(out[section], table, section, warn)
    for key in _SUBCOMMANDS:
        if isinstance(out.get(key), Mapping):
            out[key] = migrate_config(out[key], tables, warn)
    return out


def migrate_argv(args: Sequence[str], tables: Sequence[tuple[str, Mapping[str, str]]], warn: Any) -> list[str]:
    """Command-line arguments with ``--<section>.<old>[=v]`` (or ``.init_args.<old>``) renamed to the new key,
    and a whole section given as ``--<section> FILE`` (or a YAML string) migrated by :func:`migrate_group`."""
    out: list[str] = []
    sections = dict(tables)
    group: str | None = None  # the section whose value the previous argument (``--data``) awaits
    for arg in args:
        if group is not None:
            out.append(migrate_group(arg, group, sections[group], warn))
            group = None
            continue
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        head, dot, key = name.partition(".")
        if not dot and head in sections:
            if eq:
                arg = f"--{head}={migrate_group(value, head, sections[head], warn)}"
            else:
                group = head
            out.append(arg)
            continue
        key = key.removeprefix("init_args.")
        plus = "+" if key.endswith("+") else ""
        for section, table in tables:
            old = key.removesuffix("+")
            if head == section and old in table:
                arg = f"--{section}.{table[old]}{plus}{eq}{value}"
                warn(f"{section}.{old} is deprecated: use {section}.{table[old]}")
        out.append(arg)
    return out


def migrate_group(value: str, section: str, table: Mapping[str, str], warn: Any) -> str:
    """The value of ``--<section> VALUE`` (a config file of that section alone, or a YAML/JSON string) with its
    old flat keys moved into place; returned unchanged (the same path or string) when nothing moved, so
    jsonargparse reads it as before (a file's relative paths included)."""
    path = Path(value)
    try:
        content = path.read_text(encoding="utf-8") if path.is_file() else value
        loaded = get_loader("yaml")(content)
    except Exception:  # unreadable or not YAML: jsonargparse itself says what is wrong with it
        return value
    if not isinstance(loaded, dict):
        return value
    migrated = migrate_legacy(loaded, table, section, warn)
    return value if migrated == loaded else json.dumps(migrated)


class MedMAEArgumentParser(LightningArgumentParser):
    """The parser of ``medmae fit``: moves old flat keys (:data:`LEGACY_TABLES`) to their sections in every
    config it reads (``--config`` files and strings, ``--x.y`` arguments, checkpoint hyper-parameters), so
    jsonargparse only ever sees the new layout, and says so once per key on stderr."""

    legacy_tables: Sequence[tuple[str, Mapping[str, str]]] = LEGACY_TABLES

    def _legacy_warn(self, message: str) -> None:
        said = self.__dict__.setdefault("_legacy_said", set())
        if message not in said and rank_zero_only.rank == 0:
            said.add(message)
            prog = (self.__dict__.get("_legacy_prog") or self.prog).replace(" [options]", "")
            sys.stderr.write(f"{prog}: warning: {message}\n")

    def _migrated(self, config: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return migrate_config(config, self.legacy_tables, self._legacy_warn)
        except ValueError as e:
            self.error(str(e))

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        subcommand = next((a for a in args if a in _SUBCOMMANDS), None)
        self._legacy_prog = f"{self.prog} {subcommand}" if subcommand else self.prog
        try:
            migrated = migrate_argv(args, self.legacy_tables, self._legacy_warn)
        except ValueError as e:  # a key given both ways inside one --data / --model value
            self.error(str(e))
        return super().parse_args(migrated, *rest, **kwargs)

    def parse_string(self, content: str, *rest: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:  # read as jsonargparse will (its loader: e.g. 1e-3 is a number), rewritten only when migrated
            loaded = get_loader(self.parser_mode)(content)
        except Exception:  # not loadable: jsonargparse itself says what is wrong with it
            loaded = None
        if isinstance(loaded, dict):
            migrated = self._migrated(loaded)
            if migrated != loaded:
                content = json.dumps(migrated)  # JSON is YAML: the same values, reloaded by the same loader
        return super().parse_string(content, *rest, **kwargs)

    def parse_object(self, obj: Any, *rest: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        loaded = obj.as_dict() if isinstance(obj, Namespace) else obj
        if isinstance(loaded, dict):
            migrated = self._migrated(loaded)
            if migrated != loaded:
                obj = migrated
        return super().parse_object(obj, *rest, **kwargs)


class MedMAECLI(LightningCLI):
    """LightningCLI that turns configuration errors into a one-line error before training and reads old
    flat config keys (:class:`MedMAEArgumentParser`)."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = MedMAEArgumentParser, **kwargs: Any):
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def fail(self, message: str) -> NoReturn:
        """Print ``medmae <subcommand>: error: <message>`` on one line and exit with status 2."""
        sys.stderr.write(f"medmae {self.subcommand or ''}: error: {' '.join(str(message).split())}\n")
        raise SystemExit(2)

    def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
        """Parse, then check ``--ckpt_path`` before LightningCLI loads it for its hyper-parameters: a file
        refused by safe unpickling (a planted ``__reduce__``), not a Lightning checkpoint, or whose tensors
        do not fit the MAE its hyper-parameters describe (compared on the meta device) is one line, exit 2."""
        super().parse_arguments(parser, args)
        from medmae.finetune.checkpoints import precheck_ckpt_path

        precheck_ckpt_path(self, f"medmae {self.config.get('subcommand') or ''}".strip(), _check_mae_checkpoint)

    def before_instantiate_classes(self) -> None:
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).get("trainer")
        max_steps = trainer.get("max_steps") if trainer is not None else None
        if isinstance(max_steps, int) and max_steps < -1:
            self.fail(f"trainer.max_steps must be -1 (no limit) or >= 0, got {max_steps}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as e:
            self.fail(f"invalid configuration: {e}")

    def before_fit(self) -> None:
        self._check_trainer_limits()
        self._check_compatible()
        self._check_data(stage="fit")
        resolve_last_checkpoint(self, "medmae fit")
        from medmae.finetune.checkpoints import precheck_ckpt_path

        precheck_ckpt_path(self, "medmae fit", _check_mae_checkpoint, resolved=True)

    def before_validate(self) -> None:
        self._check_compatible()
        self._check_data(stage="validate")

    def _check_compatible(self) -> None:
        try:
            self.model.check_data_compatible(self.datamodule)
        except ValueError as e:
            self.fail(f"invalid configuration: {e}")

    def _check_trainer_limits(self) -> None:
        trainer = self.trainer
        if trainer.max_steps < -1:
            self.fail(f"trainer.max_steps must be -1 (no limit) or >= 0, got {trainer.max_steps}")
        max_epochs = trainer.fit_loop.max_epochs
        if max_epochs is not None and max_epochs < -1:
            self.fail(f"trainer.max_epochs must be -1 (no limit), null or >= 0, got {max_epochs}")

    def _check_data(self, stage: str) -> None:
        """Read the cache's manifest and build the index now, so a bad cache stops before training."""
        dm = self.datamodule
        if not isinstance(dm, CacheDataModule):
            return
        try:
            dm.setup(stage)
            if stage == "fit":
                dm.check_batches_per_epoch(self.trainer.world_size)
        except CONFIG_ERRORS as e:
            self.fail(str(e))


def resolve_last_checkpoint(cli: LightningCLI, prog: str) -> None:
    """``--ckpt_path last`` of a ``fit`` subcommand (``medmae fit``, ``finetune-seg``, ``finetune-cls``):
    call from ``before_fit``, once the trainer exists.

    Replaces ``last`` with the newest ``last*.ckpt`` of this run's checkpoint folders
    (:func:`find_last_checkpoint`) and points the logger at that checkpoint's version folder; without
    any, says so on one line (``prog``: the command's name) and starts at step 0. Any other value is
    left to Lightning.
    """
    config = cli.config_init[cli.subcommand]
    if config.get("ckpt_path") != "last":
        return
    path = find_last_checkpoint(cli.trainer)
    if path is None:
        sys.stderr.write(f"{prog}: no checkpoint of this run found (--ckpt_path last): starting at step 0\n")
        config["ckpt_path"] = None
        return
    _continue_logger_version(cli.trainer, path)
    config["ckpt_path"] = str(path)


def _check_mae_checkpoint(ckpt: dict[str, Any], where: str) -> None:
    """LightningCLI rebuilds the model with a checkpoint's hyper-parameters and loads its tensors: both
    must describe the same MAE, within the limits, before anything real is allocated."""
    from medmae.export.card import check_state_shapes

    hparams = ckpt.get("hyper_parameters", {})
    if hparams:  # old flat and new sectioned hyper-parameters alike (MAEPretrainModule.from_hparams)
        check_state_shapes(
            lambda: MAEPretrainModule.from_hparams(hparams), ckpt["state_dict"], where, "the checkpoint's MAE"
        )


def _checkpoint_dirs(trainer: Any) -> list[Path]:
    """Folders where this run's ``last.ckpt`` can be: explicit ModelCheckpoint dirpaths, or every
    logger version's ``checkpoints`` folder."""
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if len(dirs) < len(trainer.checkpoint_callbacks):
        logger = trainer.logger
        root = getattr(logger, "root_dir", None) if logger is not None else None
        if root is not None and Path(root).is_dir():
            dirs += sorted(p / "checkpoints" for p in Path(root).iterdir() if p.is_dir())
        elif logger is None:
            dirs.append(Path(trainer.default_root_dir) / "checkpoints")
    return dirs


def find_last_checkpoint(trainer: Any) -> Path | None:
    """The most recently written ``last*.ckpt`` in this run's checkpoint folders, or None."""
    candidates = [p for d in _checkpoint_dirs(trainer) if d.is_dir() for p in d.glob("last*.ckpt") if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)


def _continue_logger_version(trainer: Any, ckpt: Path) -> None:
    """Point the logger at the version folder that holds ``ckpt`` (instead of opening a new one)."""
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root is None or not hasattr(logger, "_version") or getattr(logger, "_experiment", None) is not None:
        return
    version_dir = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or version_dir.parent.resolve() != Path(root).resolve():
        return
    name = version_dir.name
    logger._version = int(name[len("version_") :]) if name.startswith("version_") and name[8:].isdigit() else name


@contextmanager
def lightning_command(command: str, subcommand: str, argv: Sequence[str]) -> Iterator[list[str]]:
    """The arguments LightningCLI parses (``[subcommand, *argv]``), with ``sys.argv`` set to
    ``[program, command, *argv]`` for the run.

    Lightning's DDP launcher starts the other ranks of a one-node ``trainer.strategy: ddp`` run by
    re-executing ``sys.argv`` (``python PROGRAM ...``, or ``python -m medmae.cli ...``), so it must
    hold the real program and the medmae command: the ranks then run ``medmae <command> <argv>``
    again. LightningCLI gets its arguments through ``args``; its warning about ``args`` beside a
    command line is expected here and silenced.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved else "medmae", command, *argv]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            yield [subcommand, *argv]
    finally:
        sys.argv = saved


def run_cli(subcommand: str, argv: Sequence[str]) -> MedMAECLI:
    """Run one LightningCLI subcommand (``fit`` / ``validate``) with medmae's model and datamodule."""
    with lightning_command(subcommand, subcommand, argv) as args:
        return MedMAECLI(
            MAEPretrainModule,
            CacheDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            parser_kwargs={"prog": "medmae"},
        )


def fit_main(argv: Sequence[str]) -> int:
    run_cli("fit", argv)
    return 0


def validate_main(argv: Sequence[str]) -> int:
    run_cli("validate", argv)
    return 0
