"""The handlers of the ``smolora`` registry subcommands: register, transition, promote, rollback, versions.

Like every handler (see :mod:`smolora_mlflow.cli.commands`, which holds the command table), each checks its
options first, then calls :mod:`smolora_mlflow.registry` (imported inside the handler) and prints the result.
"""

from __future__ import annotations

import argparse

from smolora_mlflow.cli.option_values import promotion_direction, use_tracking_uri
from smolora_mlflow.config_parsing import parse_bool


def cmd_register(args: argparse.Namespace) -> int:
    use_tracking_uri(args.tracking_uri)
    from smolora_mlflow import registry
    from smolora_mlflow.evaluation.loading import logged_model_uri_of_run
    from smolora_mlflow.refs import is_run_id

    ref = args.model
    if is_run_id(ref):  # a pipeline's parent run points to the run that logged the model
        ref = logged_model_uri_of_run(ref) or ref
    mv = registry.register(ref, args.name, description=args.description, semver=args.semver)
    semver = mv.tags.get(registry.TAG_SEMVER)
    print(f"Registered {args.name} version {mv.version}  (models:/{args.name}/{mv.version}, source {mv.source})")
    if semver:
        print(f"  semver {semver}: {mv.tags.get(registry.TAG_SEMVER_REASON, '')}  (models:/{args.name}@"
              f"{registry.semver_alias(semver)})")
    return 0


def cmd_transition(args: argparse.Namespace) -> int:
    archive = not parse_bool("no_archive_existing", args.no_archive_existing)
    use_tracking_uri(args.tracking_uri)
    from smolora_mlflow import registry

    version = _version(registry, args.name, args.version)
    mv = registry.transition(args.name, version, args.stage, archive_existing=archive, reason=args.reason)
    aliases = f" (aliases: {', '.join(mv.aliases)})" if mv.aliases else ""
    print(f"{args.name} version {mv.version} is now in {mv.current_stage}{aliases}")
    return 0


def _version(registry, name: str, version: str) -> str:
    if str(version).isascii() and str(version).isdigit():
        return str(version)
    return str(registry.resolve(name, version).version)


def cmd_promote(args: argparse.Namespace) -> int:
    force = parse_bool("force", args.force)
    higher = promotion_direction(args)
    use_tracking_uri(args.tracking_uri)
    from smolora_mlflow import registry

    version = _version(registry, args.name, args.version)
    d = registry.promote(args.name, version, to=args.to, metric=args.metric, higher_is_better=higher,
                         min_delta=args.min_delta, force=force, reason=args.reason)
    verdict = f"promoted to {d.stage}" if d.promoted else f"not promoted to {d.stage}"
    print(f"{args.name} version {version}: {verdict}: {d.reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    use_tracking_uri(args.tracking_uri)
    from smolora_mlflow import registry

    mv = registry.rollback(args.name, reason=args.reason)
    print(f"{args.name}: Production is now version {mv.version}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    history = parse_bool("history", args.history)
    use_tracking_uri(args.tracking_uri)
    from smolora_mlflow import registry

    print(registry.format_versions(registry.versions(args.name)))
    if history:
        df = registry.history(args.name)
        print()
        print(df.to_string(index=False) if not df.empty else "(no transitions)")
    return 0
