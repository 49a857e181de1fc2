"""``--include`` / ``--exclude`` patterns: ``SRCGLOB`` or ``SRCGLOB[KEYGLOB]``.

Globs are :mod:`fnmatch` globs, case-sensitive (``*``, ``?``, ``[abc]``,
``[!abc]``).  Semantics follow extra_data's ``select``:

- a pattern without a key part selects every key of the matching sources;
- for CONTROL sources, a key glob that does not end in ``.value`` or ``*``
  gets ``.value`` appended (``[*Position]`` gives ``actualPosition.value``,
  not the ``.timestamp`` keys);
- a pattern that matches nothing is an error.

Unlike extra_data (which splits at the *first* ``[``), the key part is the
*trailing* bracket group, found by matching brackets from the end, so glob
character classes work in the source part: ``JNGFR0[1-2]:daqOutput[data.adc]``
is source glob ``JNGFR0[1-2]:daqOutput`` and key glob ``data.adc``.  A
pattern ending in ``]`` always has a key part; to end a source glob with a
character class, add ``[*]``: ``JNGFR0[12][*]``.  ``first_bracket=True``
(``--split-at-first-bracket``) splits as extra_data does
(``docs/replay-differences.md``).
"""

import fnmatch
import re

from .errors import NoMatchError, PatternError

__all__ = ["parse_pattern", "select_sources", "Selection"]


def parse_pattern(pattern, first_bracket=False):
    """Split ``pattern`` into ``(source_glob, key_glob)``; key_glob is ``'*'`` when absent.

    ``first_bracket``: extra_data's rule instead: a pattern with a ``[`` must end in
    ``]``, and the key part starts after its first ``[``.

    Raises
    ------
    PatternError
        Empty source part, unbalanced brackets.
    """
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(f"empty selection pattern {pattern!r}", pattern)
    if first_bracket:
        if "[" not in pattern:
            return pattern, "*"
        if not pattern.endswith("]"):
            raise PatternError(f"Missing final ] in {pattern!r}", pattern)
        src, key = pattern[:-1].split("[", 1)
        if not src or not key:
            raise PatternError(f"Empty source or key glob in {pattern!r}", pattern)
        return src, key
    if not pattern.endswith("]"):
        if pattern.count("[") > pattern.count("]"):
            raise PatternError(f"Missing final ] in {pattern!r}", pattern)
        return pattern, "*"
    depth = 0
    for i in range(len(pattern) - 1, -1, -1):
        c = pattern[i]
        if c == "]":
            depth += 1
        elif c == "[":
            depth -= 1
            if depth == 0:
                src, key = pattern[:i], pattern[i + 1:-1]
                break
    else:
        raise PatternError(f"Unbalanced [ ] in {pattern!r}", pattern)
    if not src:
        raise PatternError(f"No source glob before [{key}] in {pattern!r}", pattern)
    if not key:
        raise PatternError(f"Empty key glob in {pattern!r}", pattern)
    return src, key


def _key_regex(key_glob, control):
    if control and not key_glob.endswith((".value", "*")):
        key_glob += ".value"
    return re.compile(fnmatch.translate(key_glob))


class Selection(dict):
    """``{source: [keys]}`` with keys in sorted order; sources sorted too."""

    def total_keys(self):
        return sum(len(v) for v in self.values())


def select_sources(reader, include=None, exclude=(), source_glob=None, key_glob=None,
                   first_bracket=False):
    """Resolve patterns against ``reader`` (a :class:`RunReader`).

    Parameters
    ----------
    include : list of str, optional
        ``SRC`` / ``SRC[key]`` patterns; every source when None or empty.
    exclude : list of str
        Patterns removed afterwards (whole sources without a key part).
    source_glob, key_glob : str, optional
        serve-files' ``--source`` / ``--key``: one more include pair.
    first_bracket : bool
        Split patterns at their first ``[`` (extra_data's rule, :func:`parse_pattern`).

    Returns
    -------
    Selection

    Raises
    ------
    NoMatchError
        An include pattern matches nothing.
    PatternError
        A malformed pattern.
    """
    pairs = [parse_pattern(p, first_bracket) for p in (include or ())]
    if source_glob is not None or key_glob is not None:
        pairs.append((source_glob or "*", key_glob or "*"))
    if not pairs:
        pairs = [("*", "*")]
    sources = sorted(reader.all_sources)
    chosen = {}
    for (sg, kg), text in zip(pairs, list(include or ()) + [f"{source_glob}[{key_glob}]"]):
        sre = re.compile(fnmatch.translate(sg))
        matched = False
        for src in sources:
            if not sre.match(src):
                continue
            keys = reader.keys(src)
            if kg == "*":
                # every key, also none: a source without keys is sent with its metadata
                # alone, as extra_data does
                hit = keys
                matched = True
                chosen.setdefault(src, set()).update(hit)
                continue
            kre = _key_regex(kg, reader.is_control(src))
            hit = [k for k in keys if kre.match(k)]
            if hit:
                matched = True
                chosen.setdefault(src, set()).update(hit)
        if not matched:
            raise NoMatchError(f"No source or key matches {text!r} (source glob {sg!r}, "
                               f"key glob {kg!r})", text)
    for p in exclude or ():
        sg, kg = parse_pattern(p, first_bracket)
        sre = re.compile(fnmatch.translate(sg))
        for src in list(chosen):
            if not sre.match(src):
                continue
            if kg == "*":
                del chosen[src]
                continue
            kre = _key_regex(kg, reader.is_control(src))
            chosen[src] = {k for k in chosen[src] if not kre.match(k)}
            if not chosen[src]:
                del chosen[src]
    return Selection((s, sorted(chosen[s])) for s in sorted(chosen))
