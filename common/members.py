"""Level 4's ensemble members outside the lesson: the --models and --weights flags."""

from __future__ import annotations

from common.training import SetupError


FROM_SCRATCH = ("cifarnet",)  # members that are not timm models: common/cifarnet.py's network


def member_names(spec: str) -> list[str]:
    """--models: comma-separated timm names (NAME+se for Level 3's SE block on NAME) or `cifarnet`, each at most
    once."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SetupError("--models is empty: give comma-separated timm names, e.g. resnet50+se,efficientnet_b0.")
    if len(set(names)) != len(names):
        raise SetupError(f"--models names a member twice: {spec}.")
    from common.models import check_model_name

    for name in names:  # all of them now: a typo in the last member must not wait for the others to train
        if name not in FROM_SCRATCH:
            check_model_name(name.removesuffix("+se"), flag="--models")
    return names


def member_weights(flag: str | None, members: list[str]) -> dict[str, str | None]:
    """--weights: NAME=FILE pairs (comma-separated), or a bare FILE when there is a single member."""
    if not flag:
        return {name: None for name in members}
    if "=" not in flag:
        if len(members) != 1:
            raise SetupError("--weights FILE is ambiguous with several members: give NAME=FILE pairs, e.g. "
                             f"--weights {members[0]}=FILE (members without one download, or use --no-pretrained).")
        return {members[0]: flag}
    pairs = dict(item.split("=", 1) for item in flag.split(",") if item.strip())
    unknown = [name for name in pairs if name not in members]
    if unknown:
        raise SetupError(f"--weights names {', '.join(unknown)}, which is not among --models {','.join(members)}.")
    return {name: pairs.get(name) for name in members}
