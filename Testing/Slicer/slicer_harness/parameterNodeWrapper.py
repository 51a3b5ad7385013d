"""``slicer.parameterNodeWrapper`` for the harness: typed properties over a ``vtkMRMLScriptedModuleNode``.

Kept from Slicer (``Base/Python/slicer/parameterNodeWrapper``):

* the decorator reads the class's type hints (``typing.get_type_hints(include_extras=True)``),
  splits ``Annotated[...]`` into validators (``WithinRange``, ``Minimum``, ``Maximum``, ``Choice``)
  and a ``Default``; a class attribute is the default, else the type's default;
* the storage format: numbers, strings, paths and enums as ``SetParameter(name, str)``, bools as
  ``"True"`` / ``"False"``, MRML nodes (or unions of node types) as node references with an empty
  parameter of the same name - a scene saved by Slicer reads back the same;
* validation on write (wrong type, out of range, not a choice -> ``ValueError`` / ``TypeError``);
* ``default``, ``dataType``, ``getValue``, ``setValue``, ``StartModify`` / ``EndModify``,
  ``AddObserver`` / ``RemoveObserver``, ``Modified`` and the ``parameterNode`` attribute.

Not emulated: ``connectGui`` / ``disconnectGui`` need Qt widgets (they raise here); the GUI side is
checked statically against the ``.ui`` file. Lists, dicts and parameter packs are not supported.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import typing

import slicer

__all__ = ["parameterNodeWrapper", "WithinRange", "Minimum", "Maximum", "Choice", "Default", "Decimals", "SingleStep",
           "isParameterNodeWrapper", "SlicerParameterNamePropertyName", "splitAnnotations", "nodeTypes"]

SlicerParameterNamePropertyName = "SlicerParameterName"
_PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value {value} is not within range [{self.minimum}, {self.maximum}]")


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value {value} is less than minimum {self.minimum}")


class Maximum:
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"Value {value} is greater than maximum {self.maximum}")


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value {value!r} is not among the choices {self.choices}")


@dataclasses.dataclass
class Default:
    value: typing.Any


@dataclasses.dataclass
class Decimals:  # GUI-only annotations, accepted and ignored
    value: int


@dataclasses.dataclass
class SingleStep:
    value: float


_VALIDATORS = (WithinRange, Minimum, Maximum, Choice)
_GUI_ONLY = (Decimals, SingleStep)


def splitAnnotations(annotatedType):
    if typing.get_origin(annotatedType) is typing.Annotated:
        return typing.get_args(annotatedType)[0], list(typing.get_args(annotatedType)[1:])
    return annotatedType, []


def nodeTypes(type_) -> list[type] | None:
    """The MRML node classes of a node type or a Union / Optional of node types, else None."""
    if isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode):
        return [type_]
    if typing.get_origin(type_) is typing.Union:
        args = [a for a in typing.get_args(type_) if a is not type(None)]
        if args and all(isinstance(a, type) and issubclass(a, slicer.vtkMRMLNode) for a in args):
            return args
    return None


class _Serializer:
    def __init__(self, type_, name):
        self.type = type_
        self.nodeTypes = nodeTypes(type_)
        self.name = name
        if self.nodeTypes is None and type_ not in (int, float, str, bool) and type_ not in _PATH_TYPES and not (
                isinstance(type_, type) and issubclass(type_, enum.Enum)):
            raise TypeError(f"Unable to create serializer for member {name} of type {type_} (not supported by the harness)")

    def default(self):
        if self.nodeTypes is not None:
            return None
        if self.type in _PATH_TYPES:
            return self.type()
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            return next(iter(self.type))
        return self.type()

    def isIn(self, node) -> bool:
        return bool(node.HasParameter(self.name))

    def check(self, value):
        if self.nodeTypes is not None:
            if value is not None and not isinstance(value, tuple(self.nodeTypes)):
                raise TypeError(f"{self.name}: expected {[t.__name__ for t in self.nodeTypes]}, got {type(value).__name__}")
            return
        if value is None:
            raise ValueError(f"{self.name}: value must not be None")
        expected = (int, float) if self.type is float else self.type
        if self.type is int and isinstance(value, bool) or not isinstance(value, expected):
            raise TypeError(f"{self.name}: expected {self.type.__name__}, got {type(value).__name__}")

    def write(self, node, value):
        if self.nodeTypes is not None:
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        elif isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            node.SetParameter(self.name, value.name)
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if self.nodeTypes is not None:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            return self.type[text]
        return self.type(text)


@dataclasses.dataclass
class _Parameter:
    name: str
    serializer: _Serializer
    validators: list
    default: typing.Any
    annotatedType: typing.Any

    def write(self, node, value):
        self.serializer.check(value)
        if value is not None:
            for validator in self.validators:
                validator.validate(value)
        self.serializer.write(node, value)


def _makeProperty(parameter: _Parameter):
    def getter(self):
        if not parameter.serializer.isIn(self.parameterNode):
            parameter.write(self.parameterNode, parameter.default)
        return parameter.serializer.read(self.parameterNode)

    def setter(self, value):
        parameter.write(self.parameterNode, value)

    return property(getter, setter)


def _processClass(cls):
    allParameters: dict[str, _Parameter] = {}
    for name, annotated in typing.get_type_hints(cls, include_extras=True).items():
        base, annotations = splitAnnotations(annotated)
        validators = [a for a in annotations if isinstance(a, _VALIDATORS)]
        defaults = [a for a in annotations if isinstance(a, Default)]
        unused = [a for a in annotations if not isinstance(a, (*_VALIDATORS, Default, *_GUI_ONLY))]
        if unused:
            raise TypeError(f"{cls.__name__}.{name}: unsupported annotations {unused}")
        serializer = _Serializer(base, name)
        if name in cls.__dict__:
            default = cls.__dict__[name]
        elif defaults:
            default = defaults[0].value
        else:
            default = serializer.default()
        parameter = _Parameter(name, serializer, validators, default, annotated)
        serializer.check(default)
        for validator in validators if default is not None else []:
            validator.validate(default)
        allParameters[name] = parameter
        setattr(cls, name, _makeProperty(parameter))

    def __init__(self, parameterNode, prefix=None):
        if prefix:
            raise NotImplementedError("prefixes are not supported by the harness")
        self.parameterNode = parameterNode
        for parameter in allParameters.values():
            if not parameter.serializer.isIn(parameterNode):
                parameter.write(parameterNode, parameter.default)

    def _check(name):
        if name not in allParameters:
            raise ValueError(f"Cannot find a param with the given name: {name}")
        return allParameters[name]

    def connectGui(self, gui):
        raise RuntimeError("connectGui needs Qt widgets; not available in the slicer-core test harness")

    reserved = {
        "allParameters": allParameters,
        "_is_parameter_node_wrapper": True,
        "default": lambda self, name: Default(_check(name).default),
        "isCached": lambda self, name: (_check(name), False)[1],
        "dataType": staticmethod(lambda name: _check(name).annotatedType),
        "getValue": lambda self, name: (_check(name), getattr(self, name))[1],
        "setValue": lambda self, name, value: (_check(name), setattr(self, name, value))[1],
        "connectGui": connectGui,
        "connectParametersToGui": connectGui,
        "disconnectGui": lambda self, tag: None,
        "StartModify": lambda self: self.parameterNode.StartModify(),
        "EndModify": lambda self, wasModified: self.parameterNode.EndModify(wasModified),
        "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
        "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
        "Modified": lambda self: self.parameterNode.Modified(),
    }
    for attr, value in reserved.items():
        if attr in allParameters:
            raise ValueError(f"Cannot use reserved name '{attr}' in a parameterNodeWrapper")
        setattr(cls, attr, value)
    cls.__init__ = __init__
    return cls


def parameterNodeWrapper(classtype=None):
    """Class decorator: typed parameter node wrapper (see the module docstring)."""
    if classtype is None:
        return _processClass
    return _processClass(classtype)


def isParameterNodeWrapper(classOrObj) -> bool:
    return getattr(classOrObj, "_is_parameter_node_wrapper", False)
