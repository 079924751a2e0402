"""The strict, bounded YAML reader (and writer) of recipes.

A recipe is a few dozen lines, so everything here is refused early and cheaply rather than parsed at length:

* files and strings over :data:`MAX_RECIPE_BYTES` (a file is read only that far, so ``/dev/zero`` cannot hang);
* anything but a regular file (a FIFO would block the reader, a device never ends);
* YAML anchors and aliases: an alias bomb (nested aliases expanding to billions of items) would otherwise be
  expanded by the first error message or validator that looks at it;
* more than :data:`MAX_NODES` nodes or nesting deeper than :data:`MAX_DEPTH` (PyYAML composes recursively);
* duplicate mapping keys (PyYAML lets the last one win silently), named with their line;
* integers longer than :data:`MAX_INT_CHARS` characters (``int()`` of such text is slow, then refused).

It builds on ``yaml.SafeLoader`` (never an unsafe loader) and reads ``1e-3`` as the float 0.001, as YAML 1.2
does: YAML 1.1 needs a dot (``1.0e-3``) and reads ``1e-3`` as a string, which pydantic would coerce in technique
settings but TrainingArguments fields would refuse. :func:`dump_yaml` writes with the same rules, so a string
such as ``'1e5'`` is quoted and reads back as a string.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent

from .errors import RecipeError, clip, short_repr

# the bundled recipes are under 2 KiB; PyYAML's pure-Python scanner takes about 1 µs per byte, so this bounds
# the parse to a fraction of a second
MAX_RECIPE_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 32
MAX_INT_CHARS = 64

FLOAT_TAG = "tag:yaml.org,2002:float"
#: floats without a dot (``1e-3``, ``-2E+5``, ``.5e3``): YAML 1.2's float, which YAML 1.1 reads as a string
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_NUMBER_FIRST = list("-+0123456789.")

_NO_ANCHORS = "recipes do not support YAML anchors (&name) or aliases (*name)"
_FIX_ANCHORS = "write the value out in full at each place it is used"


class _Refused(Exception):
    """Raised inside the loader; :func:`load_yaml` turns it into a RecipeError with the recipe's path."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


def _line(mark: Any) -> str:
    return f"line {mark.line + 1}" if mark is not None else "unknown line"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases or duplicate keys, with bounded size and depth."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise _Refused(f"YAML alias *{clip(str(event.anchor), 40)} at {_line(event.start_mark)}: {_NO_ANCHORS}",
                           _FIX_ANCHORS)
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise _Refused(f"YAML anchor &{clip(str(event.anchor), 40)} at {_line(event.start_mark)}: {_NO_ANCHORS}",
                           _FIX_ANCHORS)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"the recipe has more than {MAX_NODES} YAML values (at {_line(event.start_mark)})",
                           "a recipe is a short file; remove the bulk data from it")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"the recipe nests deeper than {MAX_DEPTH} levels (at {_line(event.start_mark)})",
                               "flatten the nesting; recipes are a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first is not key_node:
                raise _Refused(
                    f"duplicate key {short_repr(key, 60)} at {_line(key_node.start_mark)} "
                    f"(first at {_line(first.start_mark)})",
                    "keep one of the two; YAML would silently keep only the last",
                )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        if len(node.value) > MAX_INT_CHARS:
            raise _Refused(f"an integer of {len(node.value)} characters at {_line(node.start_mark)}",
                           "write a number that fits in 64 bits")
        return super().construct_yaml_int(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_implicit_resolver(FLOAT_TAG, _EXP_FLOAT, _NUMBER_FIRST)


class StrictDumper(yaml.SafeDumper):
    """SafeDumper that quotes what StrictLoader would read differently (``'1e5'``) and writes no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


StrictDumper.add_implicit_resolver(FLOAT_TAG, _EXP_FLOAT, _NUMBER_FIRST)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=StrictDumper, sort_keys=False)


def check_text_size(text: str, where: str) -> None:
    # len() first: a str holds at least one byte per character, so a huge text is refused without encoding it
    if len(text) > MAX_RECIPE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"the recipe is larger than {MAX_RECIPE_BYTES // 1024} KiB",
            path=where,
            fix="a recipe is a short YAML file (a few hundred bytes); check that this is the right file",
        )


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular_error(path: str, mode: int) -> RecipeError:
    return RecipeError(
        f"not a regular file: this is {_kind(mode)}",
        path=path,
        fix="pass a recipe .yaml file (pipes and devices are not read: write the recipe to a file first)",
    )


def read_recipe_file(path: "str | Path") -> str:
    """The text of a recipe file, refusing non-regular files, files over the size limit and non-UTF-8 bytes.
    At most ``MAX_RECIPE_BYTES + 1`` bytes are read."""
    where = str(path)
    try:
        # O_NONBLOCK: a FIFO swapped in after the caller's stat must not block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot open the file ({clip(str(exc), 200)})", path=where,
                          fix="pass a readable recipe .yaml file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular_error(where, mode)
        chunks, size = [], 0
        while size <= MAX_RECIPE_BYTES:
            chunk = os.read(fd, MAX_RECIPE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise RecipeError(f"cannot read the file ({clip(str(exc), 200)})", path=where,
                          fix="pass a readable recipe .yaml file") from None
    finally:
        os.close(fd)
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"not a recipe: the file is larger than {MAX_RECIPE_BYTES // 1024} KiB",
            path=where,
            fix="a recipe is a short YAML file (a few hundred bytes); check that this is the right file",
        )
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"cannot read the file: not a recipe, it is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})",
            path=where,
            fix="save the recipe as UTF-8 text",
        ) from None


def load_yaml(text: str, where: str) -> Any:
    """Parse one YAML document with :class:`StrictLoader`; every problem is a RecipeError naming ``where``."""
    check_text_size(text, where)
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise RecipeError(exc.message, path=where, fix=exc.fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        # the problem only: str(exc) would quote the lines around the error, i.e. the file's contents
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(
            f"not valid YAML{line}: {clip(problem, 120)}; is this a recipe file?",
            path=where,
            fix="fix the YAML syntax; keys are `name: value`",
        ) from None
    except RecursionError:  # MAX_DEPTH bounds composition; this is for constructors of odd documents
        raise RecipeError("the recipe nests too deeply", path=where, fix="flatten the nesting") from None
    finally:
        loader.dispose()
