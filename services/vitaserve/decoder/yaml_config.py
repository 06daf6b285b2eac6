"""Read and write the GLM-4-Voice decoder's config.yaml (HyperPyYAML) without hyperpyyaml.

The released file builds objects with tags (`!new:cosyvoice.flow.flow.MaskedDiffWithXvec`), refers to
earlier keys (`!ref <spk_embed_dim>`) and seeds RNGs (`!apply:torch.manual_seed [1986]`). We never
import or run anything a config names: it is data. So

* `!new:pkg.Class` on a mapping -> that mapping plus `"_class": "pkg.Class"`
  (on a sequence -> `{"_class": ..., "_args": [...]}`; on an empty scalar -> `{"_class": ...}`),
* `!name:pkg.fn` -> the same with `"_name"` (a partial in HyperPyYAML),
* `!apply:pkg.fn [args]` -> `{"_apply": "pkg.fn", "_args": [...]}`, recorded, never called,
* `!ref <key>` / `!ref <a.b>` / `!ref <a[b]>` -> the referenced value (a string with several refs
  is substituted as text); reference arithmetic is rejected with a clear message.

`dump_decoder_yaml` writes the same style back, so our folders and the released one share layout and
both load with the official `load_hyperpyyaml`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml


class DecoderConfigError(ValueError):
    """A decoder config.yaml that cannot be read; the message names the file and the problem."""


class _Ref:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class _Loader(yaml.SafeLoader):
    """SafeLoader + HyperPyYAML tags + YAML 1.2 floats (`1e-06` is a float there, a str in 1.1)."""


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _construct_tagged(loader: _Loader, key: str, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.MappingNode):
        body = loader.construct_mapping(node, deep=True)
        return {key: suffix, **body}
    if isinstance(node, yaml.SequenceNode):
        return {key: suffix, "_args": loader.construct_sequence(node, deep=True)}
    value = loader.construct_scalar(node)
    if value in ("", None):
        return {key: suffix}
    return {key: suffix, "_args": [yaml.safe_load(value)]}


_Loader.add_multi_constructor("!new:", lambda l, s, n: _construct_tagged(l, "_class", s, n))
_Loader.add_multi_constructor("!name:", lambda l, s, n: _construct_tagged(l, "_name", s, n))
_Loader.add_multi_constructor("!apply:", lambda l, s, n: _construct_tagged(l, "_apply", s, n))
_Loader.add_constructor("!ref", lambda l, n: _Ref(l.construct_scalar(n)))


def _unsupported(loader: _Loader, suffix: str, node: yaml.Node):
    raise DecoderConfigError(f"line {node.start_mark.line + 1}: the tag {node.tag} is not supported")


_Loader.add_multi_constructor("!", _unsupported)  # !copy, !tuple, !include, !PLACEHOLDER, ...

_REF = re.compile(r"<([^<>]+)>")


def _lookup(root: dict, path: str):
    parts = [p for p in re.split(r"[.\[\]]", path) if p]
    value = root
    for part in parts:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise DecoderConfigError(f"!ref <{path}> names no key of the config")
    return value


def _resolve(value, root: dict, active: tuple[str, ...] = ()):
    if isinstance(value, dict):
        return {k: _resolve(v, root, active) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, active) for v in value]
    if not isinstance(value, _Ref):
        return value
    text = value.text.strip()
    whole = _REF.fullmatch(text)
    names = _REF.findall(text)
    if not names:
        raise DecoderConfigError(f"!ref {text!r} holds no <key>")
    for name in names:
        if name in active:
            raise DecoderConfigError(f"!ref <{name}> refers to itself ({' -> '.join(active + (name,))})")
    if whole:
        return _resolve(copy.deepcopy(_lookup(root, names[0])), root, active + (names[0],))
    values = {name: _resolve(_lookup(root, name), root, active + (name,)) for name in names}
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
    if numeric and re.fullmatch(r"[\s0-9.eE+\-*/%()]*", _REF.sub("", text)):
        raise DecoderConfigError(f"!ref {text!r}: arithmetic in references is not supported")
    return _REF.sub(lambda m: str(values[m.group(1)]), text)  # text substitution: <dir>/file


def parse_decoder_yaml(text: str, source: str = "config.yaml") -> dict:
    """Parse HyperPyYAML text into plain dicts (see the module docstring for the tag mapping)."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (our loader is a SafeLoader)
    except DecoderConfigError as e:
        raise DecoderConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise DecoderConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DecoderConfigError(f"{source}: the top level is not a mapping")
    try:
        return _resolve(raw, raw)
    except DecoderConfigError as e:
        raise DecoderConfigError(f"{source}: {e}") from None


def load_decoder_yaml(path) -> dict:
    """Read a decoder config.yaml (the released one or ours) into plain dicts."""
    path = Path(path)
    if not path.is_file():
        raise DecoderConfigError(f"{path}: no such file (a GLM-4-Voice decoder folder holds config.yaml)")
    return parse_decoder_yaml(path.read_text(), str(path))


class _Tagged:
    __slots__ = ("tag", "value")

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class _Dumper(yaml.SafeDumper):
    pass


def _represent_tagged(dumper: _Dumper, data: _Tagged):
    if isinstance(data.value, list):
        return dumper.represent_sequence(data.tag, data.value, flow_style=True)
    if isinstance(data.value, dict):
        return dumper.represent_mapping(data.tag, data.value, flow_style=False)
    return dumper.represent_scalar(data.tag, data.value)


_Dumper.add_representer(_Tagged, _represent_tagged)
_Dumper.add_representer(dict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=False))
_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(tuple, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v), flow_style=True))


def _to_nodes(value, top: dict, key: str | None = None, nested: bool = False):
    """Turn our plain dicts back into tagged nodes. A nested scalar whose key and value equal a
    top-level scalar's is written as `!ref <key>`, as the released file does for spk_embed_dim."""
    if (
        nested
        and key in top
        and not isinstance(value, bool)
        and type(top[key]) is type(value)
        and top[key] == value
    ):
        return _Tagged("!ref", f"<{key}>")
    if isinstance(value, dict):
        for marker, tag in (("_class", "!new:"), ("_name", "!name:"), ("_apply", "!apply:")):
            if marker not in value:
                continue
            rest = {k: v for k, v in value.items() if k != marker}
            if set(rest) <= {"_args"}:
                return _Tagged(tag + value[marker], [_to_nodes(v, top) for v in rest.get("_args", [])])
            if "_args" in rest:
                raise DecoderConfigError(f"{tag}{value[marker]}: cannot write both keyword and positional args")
            return _Tagged(tag + value[marker], {k: _to_nodes(v, top, k, True) for k, v in rest.items()})
        return {k: _to_nodes(v, top, k, nested) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_nodes(v, top) for v in value]
    return value


def dump_decoder_yaml(cfg: dict, path) -> None:
    """Write `cfg` (as `load_decoder_yaml` returns it) in the released file's HyperPyYAML style."""
    top_scalars = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    parts = []
    for key, value in cfg.items():
        node = {key: _to_nodes(value, top_scalars)}
        parts.append(yaml.dump(node, Dumper=_Dumper, sort_keys=False, indent=4, width=120))
    Path(path).write_text("".join(parts))


def decoder_yaml_for_preset(preset: str) -> dict:
    """The decoder config as a dict: "released" (THUDM/glm-4-voice-decoder values) or "tiny" (tests)."""
    from vitaserve.decoder.flow_config import released_decoder_yaml, tiny_decoder_yaml

    presets = {"released": released_decoder_yaml, "tiny": tiny_decoder_yaml}
    if preset not in presets:
        raise ValueError(f"unknown decoder preset {preset!r}; choose one of {', '.join(presets)}")
    return presets[preset]()
