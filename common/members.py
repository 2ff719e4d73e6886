"""Level 4's ensemble members outside the lesson: the --models and --weights flags."""

from __future__ import annotations

from common.device import SetupError


FROM_SCRATCH = ("cifarnet",)  # members that are not timm models: common/cifarnet.py's network
COPY = "#"  # NAME#2: a second copy of member NAME, the same network and recipe trained with the next seed


def member_network(name: str) -> str:
    """The network a member name stands for: cifarnet#2 -> cifarnet, resnet50+se -> resnet50+se."""
    return name.split(COPY)[0]


def member_seed_offset(name: str) -> int:
    """What a member adds to --seed: 0 for NAME, K - 1 for NAME#K (its own data order and random draws)."""
    return int(name.split(COPY)[1]) - 1 if COPY in name else 0


def member_names(spec: str) -> list[str]:
    """--models: comma-separated timm names (NAME+se for Level 3's SE block on NAME) or `cifarnet`, each at most
    once; NAME#2, NAME#3... add copies of NAME trained with the next seeds (a seed ensemble)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SetupError("--models is empty: give comma-separated timm names, e.g. resnet50+se,efficientnet_b0.")
    if len(set(names)) != len(names):
        raise SetupError(f"--models names a member twice: {spec} (NAME#2 adds a second copy of NAME, trained "
                         f"with the next seed).")
    from common.models import check_model_name

    for name in names:  # all of them now: a typo in the last member must not wait for the others to train
        network, _, copy = name.partition(COPY)
        if COPY in name and not (copy.isdigit() and int(copy) >= 2):
            raise SetupError(f"--models {name}: a copy is NAME#2, NAME#3, ... (the K-th copy of NAME).")
        if network not in FROM_SCRATCH:
            check_model_name(network.removesuffix("+se"), flag="--models")
    return names


def member_weights(flag: str | None, members: list[str]) -> dict[str, str | None]:
    """--weights: NAME=FILE pairs (comma-separated), or a bare FILE when there is a single member."""
    if not flag:
        return {name: None for name in members}
    from common.models import weight_pairs

    pairs = weight_pairs(flag)
    if None in pairs:  # a bare FILE
        if len(members) != 1:
            raise SetupError("--weights FILE is ambiguous with several members: give NAME=FILE pairs, e.g. "
                             f"--weights {members[0]}=FILE (members without one download, or use --no-pretrained).")
        return {members[0]: pairs[None]}
    unknown = [name for name in pairs if name not in members]
    if unknown:
        raise SetupError(f"--weights names {', '.join(unknown)}, which is not among --models {','.join(members)}.")
    # a copy (NAME#2) starts from NAME's file unless it is given its own
    return {name: pairs.get(name, pairs.get(member_network(name))) for name in members}
