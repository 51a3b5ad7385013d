"""``slicer.parameterNodeWrapper`` for the harness, written from Slicer's behaviour (not its code).

Followed: ``Base/Python/slicer/parameterNodeWrapper/{wrapper,serializers,validators,util,default,
guiConnectors}.py`` at tag v5.6.0 (the oldest supported release; v5.8.0 has the same wrapper and
serializers), with the v5.10.0 differences switched on by the emulated version
(``slicer.app.majorVersion`` / ``minorVersion``, see :meth:`Harness.emulate`).

Behaviour kept:

* the decorator reads ``typing.get_type_hints(cls, include_extras=True)``; ``Annotated`` extras
  are validators (``WithinRange``, ``Minimum``, ``Maximum``, ``Choice``, ``Exclude``), one
  ``Default`` and GUI hints (``Decimals``, ``SingleStep``); other extras are logged as unused;
  a class attribute is the default, else ``Default``, else the serializer's default;
* serializers with their validators: numbers / str / Path / bool (``NotNone`` + ``IsInstance``),
  nodes (``IsInstance`` only: ``None`` allowed), enums, ``None`` and ``Union``. **A union of node
  types is nullable only when ``None`` is one of its members** (``Optional[...]``): its default is
  then ``None``; otherwise the default is the first member's default (``None`` for a node) and
  writing ``None`` raises ``TypeError: Unable to write value 'None' ...``, at wrapper creation;
* storage: ``SetParameter(name, str)``, bools ``"True"`` / ``"False"``, nodes as an empty
  parameter plus a node reference of the same name, union members as ``name.<i>`` (a node member
  as parameter ``name.<i>`` + reference role ``name.<i>``; ``None`` as ``name.<i> = "True"``);
* every serializer here supports caching: each wrapper keeps the value it last read and refreshes
  it on the parameter node's ``ModifiedEvent`` (a wrapper created on the same node by someone else
  sees a write only when that write's ``ModifiedEvent`` fires - after ``EndModify``);
* ``connectGui(ui)`` binds widgets carrying the ``SlicerParameterName`` dynamic property (of a
  widget's children, or of an object's attributes) through GUI connectors, writes the parameter
  values into them, and adds a ``ModifiedEvent`` observer that refreshes *all* connected GUIs of
  this wrapper and is never removed; **it returns ``None`` in 5.6 and 5.8** (the tag only in
  5.10); ``connectParametersToGui(mapping)`` returns the tag in all three; ``disconnectGui(tag)``
  stops the widget -> parameter callbacks of that tag and forgets it (an unknown tag: nothing);
* GUI connectors match the widget's exact class (``type(widget) == ...``) as Slicer does.

Not covered: parameter packs, lists / tuples / dicts / ``Any`` (raise), ``FloatRange``,
``createGui``, ``findChildWidgetForParameter``; GUI connectors exist only for the stand-in widget
classes of :mod:`.widgets`.
"""

from __future__ import annotations

import enum
import logging
import pathlib
import types
import typing
import weakref

import slicer

__all__ = ["parameterNodeWrapper", "WithinRange", "Minimum", "Maximum", "Choice", "Exclude", "NotNone", "IsInstance", "Default",
           "Decimals", "SingleStep", "isParameterNodeWrapper", "SlicerParameterNamePropertyName", "splitAnnotations", "unannotatedType",
           "getNodeTypes", "isNodeOrUnionOfNodes", "createGuiConnector"]

SlicerParameterNamePropertyName = "SlicerParameterName"
_PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath)


def _emulatedVersion() -> tuple[int, int]:
    app = getattr(slicer, "app", None)
    return (getattr(app, "majorVersion", 5), getattr(app, "minorVersion", 6)) if app is not None else (5, 6)


# -- validators --------------------------------------------------------------------------------

class Validator:
    def validate(self, value) -> None:
        raise NotImplementedError


class NotNone(Validator):
    def validate(self, value) -> None:
        if value is None:
            raise ValueError("Value must not be None")


class IsNone(Validator):
    def validate(self, value) -> None:
        if value is not None:
            raise ValueError("Value must be None")


class IsInstance(Validator):
    def __init__(self, classtype) -> None:
        self.classtype = classtype

    def validate(self, value) -> None:
        if value is not None and not isinstance(value, self.classtype):
            raise TypeError(f"Value must be of type '{self.classtype}', is type '{type(value)}' value '{value}'")


class WithinRange(Validator):
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum(Validator):
    def __init__(self, minimum) -> None:
        self.minimum = minimum

    def validate(self, value) -> None:
        if value < self.minimum:
            raise ValueError(f"Value must be greater than {self.minimum}, is {value}")


class Maximum(Validator):
    def __init__(self, maximum) -> None:
        self.maximum = maximum

    def validate(self, value) -> None:
        if value > self.maximum:
            raise ValueError(f"Value must be less than {self.maximum}, is {value}")


class Choice(Validator):
    def __init__(self, choices) -> None:
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class Exclude(Validator):
    def __init__(self, excluded) -> None:
        self.excludedValues = excluded

    def validate(self, value) -> None:
        if value in self.excludedValues:
            raise ValueError(f"Value is {value}, but must not be an excluded value")


class Default:
    def __init__(self, value=None, *, generator=None) -> None:
        self._value, self._generator = value, generator

    @property
    def value(self):
        return self._generator() if self._generator else self._value

    def __eq__(self, other) -> bool:
        return isinstance(other, Default) and (self._value, self._generator) == (other._value, other._generator)

    def __repr__(self) -> str:
        return f"Default(value={self._value!r})"


class Decimals:
    def __init__(self, value: int) -> None:
        self.value = value


class SingleStep:
    def __init__(self, value) -> None:
        self.value = value


# -- type helpers --------------------------------------------------------------------------------

def splitAnnotations(possiblyAnnotated):
    args = typing.get_args(typing.Annotated[possiblyAnnotated, "stub"])
    return args[0], list(args[1:-1])


def unannotatedType(possiblyAnnotated):
    return splitAnnotations(possiblyAnnotated)[0]


def _isNodeClass(t) -> bool:
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


def isNodeOrUnionOfNodes(datatype) -> bool:
    t = unannotatedType(datatype)
    if _isNodeClass(t):
        return True
    if typing.get_origin(t) is typing.Union:
        return all(a is type(None) or _isNodeClass(unannotatedType(a)) for a in typing.get_args(t))
    return False


def getNodeTypes(datatype) -> tuple[str, ...]:
    t = unannotatedType(datatype)
    if _isNodeClass(t):
        return (t().GetClassName(),)
    if typing.get_origin(t) is typing.Union:
        return tuple(unannotatedType(a)().GetClassName() for a in typing.get_args(t) if _isNodeClass(unannotatedType(a)))
    raise TypeError(f"Cannot handle type {datatype}")


# -- serializers -------------------------------------------------------------------------------

class _Serializer:
    """One storage format; ``validators`` run before each write."""

    validators: list

    def __init__(self, validators) -> None:
        self.validators = list(validators)

    def validate(self, value) -> None:
        for v in self.validators:
            v.validate(value)

    def canTake(self, valueType) -> bool:
        raise NotImplementedError

    def isIn(self, node, name) -> bool:
        return bool(node.HasParameter(name))

    def write(self, node, name, value) -> None:
        self.validate(value)
        self._store(node, name, value)

    def remove(self, node, name) -> None:
        node.UnsetParameter(name)

    def supportsCaching(self) -> bool:
        return True


class _ScalarSerializer(_Serializer):
    def __init__(self, type_, validators) -> None:
        super().__init__(validators)
        self.type = type_

    def canTake(self, valueType) -> bool:
        if self.type in (int, float):
            return valueType in (int, float)
        return valueType == self.type

    def default(self):
        if self.type in (int, float):
            return 0
        if self.type is str:
            return ""
        if self.type is bool:
            return False
        return self.type()  # paths

    def _store(self, node, name, value) -> None:
        if self.type is bool:
            node.SetParameter(name, "True" if value else "False")
        else:
            node.SetParameter(name, str(value))

    def read(self, node, name):
        text = node.GetParameter(name)
        if self.type is bool:
            return text == "True"
        if self.type is str:
            return text
        return self.type(text)


class _EnumSerializer(_Serializer):
    def __init__(self, type_, validators) -> None:
        super().__init__(validators)
        self.type = type_

    def canTake(self, valueType) -> bool:
        return isinstance(valueType, type) and issubclass(valueType, enum.Enum)

    def default(self):
        return next(iter(self.type))

    def _store(self, node, name, value) -> None:
        node.SetParameter(name, value.name)

    def read(self, node, name):
        return self.type[node.GetParameter(name)]


class _NodeSerializer(_Serializer):
    def canTake(self, valueType) -> bool:
        return _isNodeClass(valueType)

    def default(self):
        return None

    def _store(self, node, name, value) -> None:
        node.SetParameter(name, "")
        node.SetNodeReferenceID(name, value.GetID() if value is not None else None)

    def read(self, node, name):
        return node.GetNodeReference(name)

    def remove(self, node, name) -> None:
        node.UnsetParameter(name)
        node.RemoveNodeReferenceIDs(name)


class _NoneSerializer(_Serializer):
    def canTake(self, valueType) -> bool:
        return valueType is type(None)

    def default(self):
        return None

    def _store(self, node, name, value) -> None:
        node.SetParameter(name, "True")

    def read(self, node, name):
        return None


class _UnionSerializer(_Serializer):
    """Members stored under ``name.<i>``; the first member able to take the value's type and
    passing its validators wins; no member for the value's type -> ``TypeError``."""

    def __init__(self, members, validators) -> None:
        super().__init__(validators)
        self.members = members

    def default(self):
        if len(self.members) == 2 and isinstance(self.members[1], _NoneSerializer):
            return None
        return self.members[0].default()

    def isIn(self, node, name) -> bool:
        return any(m.isIn(node, f"{name}.{i}") for i, m in enumerate(self.members))

    def _choose(self, value):
        error = None
        for i, member in enumerate(self.members):
            if member.canTake(type(value)):
                try:
                    member.validate(value)
                    return i, member
                except Exception as exc:  # noqa: BLE001 - try the next member, as Slicer does
                    error = exc
        if error is not None:
            raise error
        raise TypeError(f"Unable to write value '{value}' of type '{type(value)}'")

    def write(self, node, name, value) -> None:
        self.validate(value)
        with slicer.util.NodeModify(node):
            i, member = self._choose(value)
            self.remove(node, name)
            member.write(node, f"{name}.{i}", value)

    def read(self, node, name):
        for i, member in enumerate(self.members):
            if member.isIn(node, f"{name}.{i}"):
                return member.read(node, f"{name}.{i}")
        raise KeyError(f"Unable to find value for name: {name}")

    def remove(self, node, name) -> None:
        with slicer.util.NodeModify(node):
            for i, member in enumerate(self.members):
                member.remove(node, f"{name}.{i}")


def _createSerializer(type_, validators):
    if isinstance(type_, getattr(types, "UnionType", ())):
        if _emulatedVersion() < (5, 10):
            raise TypeError(f"Unable to create serializer for type: {type_} (PEP 604 unions need Slicer 5.10)")
        type_ = typing.Union[typing.get_args(type_)]
    if type_ in (int, float):
        return _ScalarSerializer(type_, [NotNone(), IsInstance((int, float) if type_ is float else int), *validators])
    if type_ in (str, bool) or type_ in _PATH_TYPES:
        return _ScalarSerializer(type_, [NotNone(), IsInstance(type_), *validators])
    if _isNodeClass(type_):
        return _NodeSerializer([IsInstance(type_), *validators])
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return _EnumSerializer(type_, [IsInstance(type_), *validators])
    if type_ is type(None):
        return _NoneSerializer([IsNone(), *validators])
    if typing.get_origin(type_) is typing.Union:
        members = []
        for arg in typing.get_args(type_):
            base, extras = splitAnnotations(arg)
            members.append(_createSerializer(base, [e for e in extras if isinstance(e, Validator)]))
        return _UnionSerializer(members, validators)
    raise TypeError(f"Unable to create serializer for type: {type_} (not supported by the harness)")


# -- the wrapper -------------------------------------------------------------------------------

class _Parameter:
    def __init__(self, name, serializer, default, annotatedType) -> None:
        self.name, self.serializer, self.default, self.annotatedType = name, serializer, default, annotatedType

    def read(self, node):
        if not self.serializer.isIn(node, self.name):
            self.serializer.write(node, self.name, self.default.value)
        return self.serializer.read(node, self.name)


class _CachedValue:
    """The value of one parameter as one wrapper sees it, refreshed on ``ModifiedEvent``."""

    def __init__(self, parameter: _Parameter, node) -> None:
        self.parameter, self.node = parameter, node
        self._value = parameter.read(node)
        self._writing = False
        selfRef = weakref.ref(self)
        self._tag = node.AddObserver(_modifiedEvent(), lambda caller, event: selfRef()._onModified())

    def __del__(self):
        try:
            self.node.RemoveObserver(self._tag)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _onModified(self) -> None:
        if not self._writing:
            self._value = self.parameter.read(self.node)

    def read(self):
        return self._value

    def write(self, value) -> None:
        self._writing = True
        try:
            with slicer.util.NodeModify(self.node):
                self.parameter.serializer.write(self.node, self.parameter.name, value)
                self._value = self.parameter.read(self.node)
        finally:
            self._writing = False


def _modifiedEvent():
    import vtk

    return vtk.vtkCommand.ModifiedEvent


def _processClass(cls):
    allParameters: dict[str, _Parameter] = {}
    for name, annotated in typing.get_type_hints(cls, include_extras=True).items():
        base, extras = splitAnnotations(annotated)
        validators = [e for e in extras if isinstance(e, Validator) or (isinstance(e, type) and issubclass(e, Validator))]
        defaults = [e for e in extras if isinstance(e, Default)]
        unused = [e for e in extras if e not in validators and e not in defaults and not isinstance(e, (Decimals, SingleStep))]
        try:
            serializer = _createSerializer(base, validators)
        except Exception as exc:
            raise Exception(f"Unable to create serializer for {cls} member {name}") from exc
        if hasattr(cls, name):
            default = Default(getattr(cls, name))
        elif defaults:
            default = defaults[0]
        else:
            default = Default(serializer.default())
        if unused:
            logging.warning(f"Unused annotations: {unused}")
        allParameters[name] = _Parameter(name, serializer, default, annotated)
        setattr(cls, name, property(lambda self, n=name: self._values[n].read(),
                                    lambda self, value, n=name: self._values[n].write(value)))

    def __init__(self, parameterNode, prefix=None):
        if prefix:
            raise NotImplementedError("prefixes are not supported by the harness")
        self.parameterNode = parameterNode
        self._parameterGUIs = {}
        self._nextParameterGUIsTag = 0
        self._updatingGUIFromParameterNode = False
        self._values = {}
        for parameter in allParameters.values():
            if not parameter.serializer.isIn(parameterNode, parameter.name):
                parameter.serializer.write(parameterNode, parameter.name, parameter.default.value)
            self._values[parameter.name] = _CachedValue(parameter, parameterNode)

    def check(name):
        if name not in allParameters:
            raise ValueError(f"Cannot find a param with the given name: {name}")
        return allParameters[name]

    def dataType(name):
        return check(name).annotatedType

    reserved = {
        "allParameters": allParameters,
        "_is_parameter_node_wrapper": True,
        "default": lambda self, name: check(name).default,
        "isCached": lambda self, name: (check(name), True)[1],
        "dataType": staticmethod(dataType),
        "getValue": lambda self, name: (check(name), self._values[name].read())[1],
        "setValue": lambda self, name, value: (check(name), self._values[name].write(value))[1],
        "connectGui": _connectGui,
        "connectParametersToGui": _connectParametersToGui,
        "disconnectGui": _disconnectGui,
        "StartModify": lambda self: self.parameterNode.StartModify(),
        "EndModify": lambda self, wasModified: self.parameterNode.EndModify(wasModified),
        "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
        "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
        "Modified": lambda self: self.parameterNode.Modified(),
    }
    for attr, value in reserved.items():
        if hasattr(cls, attr):
            raise ValueError(f"Cannot use reserved name '{attr}' in a parameterNodeWrapper")
        setattr(cls, attr, value)
    cls.__init__ = __init__
    return cls


def _updateGuis(self) -> None:
    if self._updatingGUIFromParameterNode:
        return
    self._updatingGUIFromParameterNode = True
    try:
        with slicer.util.NodeModify(self):
            for mapping in list(self._parameterGUIs.values()):
                for name, connector in mapping.items():
                    connector.write(self.getValue(name))
    finally:
        self._updatingGUIFromParameterNode = False


def _connectParametersToGui(self, mapping):
    for name in mapping:
        if name not in self.allParameters:
            raise ValueError(f"Cannot find a param with the given name: {name}")
    connectors = {name: w if isinstance(w, GuiConnector) else createGuiConnector(w, self.dataType(name)) for name, w in mapping.items()}
    tag = self._nextParameterGUIsTag
    self._nextParameterGUIsTag += 1
    self._parameterGUIs[tag] = connectors
    for name, connector in connectors.items():
        connector.write(self.getValue(name))

        def callback(name=name, connector=connector):
            with slicer.util.NodeModify(self):
                if not self._updatingGUIFromParameterNode:
                    self.setValue(name, connector.read())

        connector.onChanged(callback)
    self.AddObserver(_modifiedEvent(), lambda caller, event: _updateGuis(self))  # never removed, as in Slicer
    return tag


def _connectGui(self, gui):
    mapping = {}
    if getattr(gui, "isWidgetType", lambda: False)():
        widgets = gui.findChildren(_qt().QWidget)
    else:
        widgets = list(vars(gui).values())
    for widget in widgets:
        name = widget.property(SlicerParameterNamePropertyName)
        if name:
            mapping[name] = widget
    tag = _connectParametersToGui(self, mapping)
    return tag if _emulatedVersion() >= (5, 10) else None


def _disconnectGui(self, tag) -> None:
    if tag in self._parameterGUIs:
        for connector in self._parameterGUIs[tag].values():
            connector.onChanged(None)
        del self._parameterGUIs[tag]


def parameterNodeWrapper(classtype=None):
    """Class decorator: typed parameter node wrapper (see the module docstring)."""
    if classtype is None:
        return _processClass
    return _processClass(classtype)


def isParameterNodeWrapper(classOrObj) -> bool:
    return getattr(classOrObj, "_is_parameter_node_wrapper", False)


# -- GUI connectors ---------------------------------------------------------------------------

def _qt():
    import qt

    return qt


def _ctk():
    import ctk

    return ctk


class GuiConnector:
    def __init__(self, widget) -> None:
        self._widget = widget
        self._callback = None

    def onChanged(self, callback) -> None:
        self._callback = callback
        if callback is None:
            self._signal().disconnect(self.changed)
        else:
            self._signal().connect(self.changed)

    def changed(self, *args) -> None:
        if self._callback:
            self._callback()

    def widget(self):
        return self._widget


class _BoolConnector(GuiConnector):
    def __init__(self, widget) -> None:
        super().__init__(widget)
        if type(widget) is _qt().QPushButton and not widget.checkable:
            logging.warning("Making push button checkable for conversion to bool")
            widget.checkable = True

    def _signal(self):
        return self._widget.stateChanged if type(self._widget) is _qt().QCheckBox else self._widget.toggled

    def read(self):
        return self._widget.checked

    def write(self, value) -> None:
        self._widget.checked = value


class _FloatConnector(GuiConnector):
    def __init__(self, widget, datatype) -> None:
        super().__init__(widget)
        extras = splitAnnotations(datatype)[1]
        for e in extras:
            if isinstance(e, Decimals):
                widget.decimals = e.value
            if isinstance(e, SingleStep):
                widget.singleStep = e.value
        within = next((e for e in extras if isinstance(e, WithinRange)), None)
        low = next((e for e in extras if isinstance(e, Minimum)), None)
        high = next((e for e in extras if isinstance(e, Maximum)), None)
        if within is None and (low is None or high is None) and type(widget).__name__ in ("ctkSliderWidget", "qMRMLSliderWidget"):
            raise RuntimeError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
        if within is not None:
            widget.minimum, widget.maximum = within.minimum, within.maximum
        else:
            widget.minimum = low.minimum if low is not None else float("-inf")
            widget.maximum = high.maximum if high is not None else float("inf")

    def _signal(self):
        return self._widget.valueChanged

    def read(self):
        return self._widget.value

    def write(self, value) -> None:
        self._widget.value = value


class _ChoiceComboConnector(GuiConnector):
    def __init__(self, widget, datatype) -> None:
        super().__init__(widget)
        choice = next((e for e in splitAnnotations(datatype)[1] if isinstance(e, Choice)), None)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        self._choices = choice.choices
        widget.clear()
        for c in self._choices:
            widget.addItem(str(c))

    def _signal(self):
        return self._widget.currentIndexChanged

    def read(self):
        return self._choices[self._widget.currentIndex]

    def write(self, value) -> None:
        for i, c in enumerate(self._choices):
            if c == value:
                self._widget.currentIndex = i
                return
        raise ValueError(f"Unable to find value {value} in choices {self._choices}")


class _LineEditConnector(GuiConnector):
    def _signal(self):
        return self._widget.textChanged

    def read(self):
        return self._widget.text

    def write(self, value) -> None:
        if _emulatedVersion() >= (5, 10) and value == self._widget.text:
            return
        self._widget.text = value


class _DirectoryButtonConnector(GuiConnector):
    def __init__(self, widget, datatype) -> None:
        super().__init__(widget)
        self._type = unannotatedType(datatype)

    def _signal(self):
        return self._widget.directoryChanged

    def read(self):
        return self._type(self._widget.directory)

    def write(self, value) -> None:
        self._widget.directory = str(value)


class _NodeComboConnector(GuiConnector):
    def __init__(self, widget, datatype) -> None:
        super().__init__(widget)
        widget.nodeTypes = getNodeTypes(datatype)

    def _signal(self):
        return self._widget.currentNodeChanged

    def read(self):
        return self._widget.currentNode()

    def write(self, value) -> None:
        self._widget.setCurrentNode(value)


def createGuiConnector(widget, datatype) -> GuiConnector:
    qt, ctk = _qt(), _ctk()
    t = unannotatedType(datatype)
    if isinstance(t, getattr(types, "UnionType", ())):
        t = typing.Union[typing.get_args(t)]
        datatype = t
    wt = type(widget)
    if t is bool and wt in (qt.QCheckBox, qt.QPushButton):
        return _BoolConnector(widget)
    if t is float and wt in (ctk.ctkSliderWidget, slicer.qMRMLSliderWidget):
        return _FloatConnector(widget, datatype)
    if wt is qt.QComboBox and t in (int, float, str, bool):
        return _ChoiceComboConnector(widget, datatype)
    if wt is qt.QLineEdit and t is str:
        return _LineEditConnector(widget)
    if wt is ctk.ctkDirectoryButton and t in _PATH_TYPES:
        return _DirectoryButtonConnector(widget, datatype)
    if wt is slicer.qMRMLNodeComboBox and isNodeOrUnionOfNodes(datatype):
        return _NodeComboConnector(widget, datatype)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{wt}'")
