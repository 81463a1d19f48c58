"""Which samples go where, and the checks that make a bad choice a message instead of a silent result:
class subsets (ids or names), stratified train/val(/test) splits, low-data regimes, and empty or
unbalanced splits. Every check runs where the data is built, before anything trains."""

from collections.abc import Sequence
from numbers import Integral, Real
from typing import cast

import torch

from transferlab.core.errors import UserError


def check_settings(
    key: str, batch_size, eval_batch_size, num_workers, val_fraction, samples_per_class, label_fraction, test_fraction
) -> None:
    """Types and ranges of a data module's split and loader settings (`key`: e.g. data.target, for messages)."""

    def integer(name, value, low, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            raise UserError(
                f"{key}.{name} must be a whole number >= {low}{' or null' if allow_none else ''}, got {value!r}."
            )

    def fraction(name, value, low_open, allow_none=False, hint=""):
        if value is None and allow_none:
            return
        ok = (
            not isinstance(value, bool)
            and isinstance(value, Real)
            and ((0 < value <= 1) if low_open else (0 <= value < 1))
        )
        if not ok:
            span = "(0, 1]" if low_open else "[0, 1)"
            raise UserError(
                f"{key}.{name} must be a number in {span}{' or null' if allow_none else ''}, got {value!r}.{hint}"
            )

    integer("batch_size", batch_size, 1)
    whole = (
        isinstance(eval_batch_size, Integral) and not isinstance(eval_batch_size, bool) and int(eval_batch_size) >= 1
    )
    if not (whole or eval_batch_size in ("auto", None)):
        raise UserError(
            f"{key}.eval_batch_size must be a whole number >= 1, auto (chosen for the device) or null (the "
            f"training batch size), got {eval_batch_size!r}."
        )
    integer("num_workers", num_workers, 0)
    integer("samples_per_class", samples_per_class, 1, allow_none=True)
    fraction("val_fraction", val_fraction, low_open=False)
    fraction("test_fraction", test_fraction, low_open=False)
    fraction("label_fraction", label_fraction, low_open=True, allow_none=True)


def check_class_list(key: str, classes) -> None:
    """The form of a `classes` setting, checked before any data is read: null, a count of at least 1, or a
    non-empty list without repeats (which ids or names exist is for `resolve_classes`, once the data is known)."""
    where = f"{key}.classes"
    if classes is None:
        return
    if isinstance(classes, bool) or isinstance(classes, (str, Real)) and not isinstance(classes, Integral):
        raise UserError(f"{where}={classes!r}: give null (all classes), a count, or a list of class ids or names.")
    if isinstance(classes, Integral):
        if classes < 1:
            raise UserError(f"{where}={classes}: give a count of at least 1, null (all classes), or a list.")
        return
    classes = list(classes)
    if not classes:
        raise UserError(f"{where}=[] selects no class: give null (all classes), a count, or a non-empty list.")
    duplicates = sorted({c for c in classes if classes.count(c) > 1}, key=str)
    if duplicates:
        raise UserError(
            f"{where} lists {duplicates} more than once (by id or name): give each class "
            "once; the labels are numbered in the order given."
        )


def resolve_classes(key: str, classes, total: int, names: Sequence[str] | None) -> list[int]:
    """The original class ids that `classes` selects, in order: null (all), N (the first N), or a list of ids or
    names (`names`: the dataset's class names, where it has them)."""
    check_class_list(key, classes)
    where = f"{key}.classes"
    if classes is None:
        return list(range(total))
    if isinstance(classes, Integral):
        if int(classes) > total:
            raise UserError(f"{where}={classes}: the dataset has {total} classes; give a count from 1 to {total}.")
        return list(range(classes))
    classes = list(classes)
    lookup = {name: i for i, name in enumerate(names or [])}
    ids, unknown = [], []
    for c in classes:
        if isinstance(c, Integral) and not isinstance(c, bool) and 0 <= int(c) < total:
            ids.append(int(c))
        elif isinstance(c, str) and c in lookup:
            ids.append(lookup[c])
        else:
            unknown.append(c)
    if unknown:
        known = (
            f"class names: {', '.join(list(lookup)[:12])}{', ...' if len(lookup) > 12 else ''}"
            if lookup
            else "this dataset's classes have no names"
        )
        raise UserError(
            f"{where}: {unknown[:10]} {'is' if len(unknown) == 1 else 'are'} not a class of this dataset "
            f"(class ids 0..{total - 1}; {known})."
        )
    if len(set(ids)) != len(ids):  # the same class by id and by name
        raise UserError(
            f"{where} lists a class more than once (by id or name): give each class "
            "once; the labels are numbered in the order given."
        )
    return ids


def held_out(n: int, fraction: float) -> int:
    """How many of a class's `n` images a `fraction` holds out (for validation, or for test)."""
    return int(round(fraction * n))


def check_samples_per_class(
    key: str, labels: torch.Tensor, val_fraction: float, samples_per_class: int, class_ids: list[int], names
) -> None:
    """`samples_per_class` is the training images of every class: a class with fewer (after the validation
    hold-out) would train on what it has, unbalancing the low-data regime asked for. `labels`: renumbered, -1 for
    images not in the pool. A class with none left is `check_classes_present`'s."""
    counts = torch.bincount(labels[labels >= 0], minlength=len(class_ids)).tolist()
    left = {i: n - held_out(n, val_fraction) for i, n in enumerate(counts)}
    short = {i: n for i, n in left.items() if 0 < n < samples_per_class}
    if short:
        listing = ", ".join(f"class {class_label(i, class_ids, names)}: {n}" for i, n in list(short.items())[:10])
        which = "this class has" if len(short) == 1 else f"these {len(short)} classes have"
        raise UserError(
            f"{key}.samples_per_class={samples_per_class} is more training images than {which} once the validation "
            f"(and any test) images are held out: {listing}{', ...' if len(short) > 10 else ''}. Set "
            f"{key}.samples_per_class to at most {min(short.values())}, or to null for all of each class's images."
        )


def class_label(i: int, class_ids: list[int], names) -> str:
    """Renumbered class `i` as messages show it: its original id, and its name where the dataset has names."""
    return f"{class_ids[i]} ({names[class_ids[i]]})" if names else str(class_ids[i])


def stratified_split(
    labels: torch.Tensor, val_fraction: float, samples_per_class: int | None, label_fraction: float | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: shuffle (by seed), hold out `val_fraction` for validation, then keep
    `samples_per_class` or `label_fraction` of the rest for training (the low-data regime).
    Samples whose label is -1 (classes not selected) are dropped."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) == 0:
            continue
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = held_out(len(idx), val_fraction)
        rest = idx[n_val:]
        if samples_per_class is not None:
            rest = rest[:samples_per_class]
        if label_fraction is not None:
            rest = rest[: max(1, int(round(label_fraction * len(rest))))]
        val.append(idx[:n_val])
        train.append(rest)
    cat = lambda parts: torch.sort(torch.cat(parts)).values if parts else torch.empty(0, dtype=torch.long)
    return cat(train), cat(val)


def check_classes_present(
    key: str,
    class_ids: list[int],
    names: Sequence[str] | None,
    train: torch.Tensor,
    others: dict[str, torch.Tensor],
    selected: bool,
) -> None:
    """Every class has training images: a class with val/test images but none to train on would be tested but
    never learnt. A class with no image at all is an error only when `classes` selected it (all of a dataset's
    label ids need not occur). `train`, `others`: renumbered labels, -1 for classes not selected."""
    counts = torch.bincount(train[train >= 0], minlength=len(class_ids))
    # a tensor: `others` is never empty (val and test)
    elsewhere = cast(torch.Tensor, sum(torch.bincount(v[v >= 0], minlength=len(class_ids)) for v in others.values()))
    missing = [i for i in range(len(class_ids)) if counts[i] == 0 and (selected or elsewhere[i] > 0)]
    if not missing:
        return
    label = lambda i: class_label(i, class_ids, names)
    seen = {split: int(sum((labels == i).sum() for i in missing)) for split, labels in others.items()}
    where = ", ".join(f"{n} {split} images" for split, n in seen.items() if n) or "no images at all"
    raise UserError(
        f"{key}: classes {[label(i) for i in missing][:10]} have no training images ({where}): a class "
        f"missing from train cannot be learnt. Leave them out with {key}.classes, add their training "
        f"images, or hold out less ({key}.val_fraction, {key}.test_fraction)."
    )


def check_not_empty(key: str, sizes: dict[str, int], val_fraction: float, val_given: bool) -> None:
    """An empty split after subsetting is an error that names the split and the setting to change."""
    hints = {
        "train": f"check {key}.classes, {key}.samples_per_class and {key}.label_fraction",
        "val": (
            f"{key}.val_fraction={val_fraction} holds out no image of any class; raise it (the best "
            "checkpoint is chosen on the validation split)"
        )
        if not val_given
        else "add images to val/",
        "test": f"check {key}.classes (and {key}.test_fraction where the test split is taken from train)",
    }
    for split, n in sizes.items():
        if n == 0 and (split != "val" or val_given or val_fraction > 0):
            raise UserError(
                f"{key}: the {split} split is empty after taking the classes and samples asked for: {hints[split]}."
            )
