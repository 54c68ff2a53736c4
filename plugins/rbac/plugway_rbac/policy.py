"""Authorization decisions: roles and permissions resolved once, rules matched per request.

``compile_policy`` turns the settings into a ``Policy`` (or raises ``PolicyErrors``
listing every problem, each with the settings key it belongs to):

- every role's permissions, inherited ones included, are resolved to the set of
  *concrete* permissions (those some rule requires) the role grants, so a request
  checks a permission with one set lookup per consumer role, wildcards already
  expanded;
- the rules that apply to each method are joined, in configuration order, into one
  regular expression (an alternation, one named group per rule), so a request
  makes one match whatever the number of rules; the first alternative that
  matches the whole path is the first matching rule, and it decides.

``Policy.decide(method, path, consumer)`` returns a ``Verdict``. Nothing here
reads sockets or aiohttp objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.paths import decode_segment

from .patterns import PathPattern

if TYPE_CHECKING:
    from gateway import Consumer

# resource:action; "*" alone may stand for either part in a role's permissions.
_NAME = r"[A-Za-z0-9_.\-]+"
PERMISSION = re.compile(rf"{_NAME}:{_NAME}")
GRANT = re.compile(rf"(?:{_NAME}|\*):(?:{_NAME}|\*)")
OWNER_VALUE = re.compile(r"consumer\.id|claims\..+")

ALLOWED = "allowed"
UNAUTHENTICATED = "unauthenticated"
FORBIDDEN = "forbidden"
NOT_OWNER = "not_owner"
NO_MATCHING_RULE = "no_matching_rule"


def permission_problem(text: object, *, wildcards: bool) -> str | None:
    """Why ``text`` is not a permission (``resource:action``; with wildcards, ``tasks:*`` too), or None."""
    if not isinstance(text, str):
        return f"must be a string, not {text!r}"
    if (GRANT if wildcards else PERMISSION).fullmatch(text):
        return None
    if not wildcards and GRANT.fullmatch(text):
        return f"{text!r}: a rule requires concrete permissions; wildcards belong in roles' permissions"
    return f'{text!r} is not a permission: write "resource:action" (letters, digits, _ . -)' + (
        ', or "resource:*", "*:action", "*:*"' if wildcards else "")


def grants(grant: str, permission: str) -> bool:
    """Whether a role's ``grant`` (maybe with wildcards) covers the concrete ``permission``."""
    if grant == permission:
        return True
    resource, _, action = grant.partition(":")
    wanted_resource, _, wanted_action = permission.partition(":")
    return resource in ("*", wanted_resource) and action in ("*", wanted_action)


@dataclass(frozen=True)
class Verdict:
    """What ``Policy.decide`` answers: ``result`` is one of ALLOWED, UNAUTHENTICATED,
    FORBIDDEN, NOT_OWNER, NO_MATCHING_RULE; ``message`` says why a request is refused;
    ``missing``: the permissions the consumer lacks; ``rule``: the index of the deciding rule, or None."""

    result: str
    message: str = ""
    missing: tuple[str, ...] = ()
    rule: int | None = None


@dataclass(frozen=True)
class Owner:
    """The consumer must own the resource: placeholder ``param`` (the match group ``group``)
    equals ``consumer.id`` (claim None) or ``consumer.claims[claim]``, unless the consumer
    holds ``unless``."""

    param: str
    group: str
    claim: str | None
    unless: str | None

    def owned_by(self, value: str, consumer: Consumer) -> bool:
        if self.claim is None:
            return value == consumer.id
        held = consumer.claims.get(self.claim)
        if isinstance(held, bool) or not isinstance(held, (str, int)):
            return False
        return value == str(held)


@dataclass(frozen=True)
class Rule:
    index: int
    group: str  # the rule's group name in its method's alternation
    pattern: PathPattern
    methods: frozenset[str] | None
    require: tuple[str, ...]
    roles: frozenset[str] | None  # consumer roles that satisfy the rule's "roles", inheritance resolved
    role_names: tuple[str, ...]
    public: bool
    owner: Owner | None
    allow: Verdict  # the verdict when the rule lets the request through, made once


class Matcher:
    """The rules that apply to one method, as one regular expression; ``rules`` by group name."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        alternatives = [f"(?P<{rule.group}>{rule.pattern.source(rule.group + '_')})" for rule in rules]
        self.regex = re.compile("|".join(alternatives) or "(?!)")
        self.rules = {rule.group: rule for rule in rules}


class Policy:
    """Compiled settings of one route: ``decide`` is all a request needs."""

    def __init__(self, rules: Sequence[Rule], role_permissions: Mapping[str, frozenset[str]],
                 scopes_as_permissions: bool, default_allow: bool) -> None:
        self.role_permissions = dict(role_permissions)
        self.scopes_as_permissions = scopes_as_permissions
        self.default = Verdict(ALLOWED) if default_allow else Verdict(
            NO_MATCHING_RULE, "no authorization rule matches this request")
        methods = {method for rule in rules for method in rule.methods or ()}
        self._by_method = {method: Matcher([r for r in rules if r.methods is None or method in r.methods])
                           for method in methods}
        self._any_method = Matcher([rule for rule in rules if rule.methods is None])

    def decide(self, method: str, path: str, consumer: Consumer | None) -> Verdict:
        matcher = self._by_method.get(method, self._any_method)
        found = matcher.regex.fullmatch(path)
        if found is None:
            return self.default
        return self._judge(matcher.rules[found.lastgroup], found, consumer)

    def holds(self, consumer: Consumer, permission: str) -> bool:
        """Whether the consumer's roles (or scopes, when they count) grant a permission some rule requires."""
        role_permissions = self.role_permissions
        for role in consumer.roles:
            granted = role_permissions.get(role)
            if granted is not None and permission in granted:
                return True
        return self.scopes_as_permissions and permission in consumer.scopes

    def _judge(self, rule: Rule, found: re.Match[str], consumer: Consumer | None) -> Verdict:
        if rule.public:
            return rule.allow
        if consumer is None:
            return Verdict(UNAUTHENTICATED, "credentials are required", rule=rule.index)
        if rule.roles is not None and not any(role in rule.roles for role in consumer.roles):
            names = ", ".join(rule.role_names)
            return Verdict(FORBIDDEN, f"this request requires the role {names}" if len(rule.role_names) == 1
                           else f"this request requires one of the roles {names}", (), rule.index)
        missing = tuple(permission for permission in rule.require if not self.holds(consumer, permission))
        if missing:
            word = "permission" if len(missing) == 1 else "permissions"
            return Verdict(FORBIDDEN, f"this request requires the {word} {', '.join(missing)}", missing, rule.index)
        owner = rule.owner
        if owner is not None and not (owner.unless and self.holds(consumer, owner.unless)):
            if not owner.owned_by(decode_segment(found.group(owner.group)), consumer):
                if owner.unless:
                    return Verdict(NOT_OWNER, f"only the owner may do this without the permission {owner.unless}",
                                   (owner.unless,), rule.index)
                return Verdict(NOT_OWNER, "only the owner may do this", (), rule.index)
        return rule.allow


# --- compiling ----------------------------------------------------------------------------------


class PolicyErrors(ValueError):
    """Every problem found while compiling, as (settings key, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {reason}" for key, reason in problems))
        self.problems = problems


def compile_policy(roles: Mapping[str, Any], rules: Sequence[Any], *, scopes_as_permissions: bool,
                   default_allow: bool) -> Policy:
    """A ``Policy`` from the settings objects (``RoleSettings`` by name, ``RuleSettings`` in order)."""
    problems: list[tuple[str, str]] = []
    inherited = _inheritance(roles, problems)
    for index, rule in enumerate(rules):
        for position, role in enumerate(rule.roles):
            if role not in roles:
                problems.append((f"rules[{index}].roles[{position}]", _unknown_role(role, roles)))
    if problems:
        raise PolicyErrors(problems)
    needed = {p for rule in rules for p in rule.require} | {rule.owner.unless for rule in rules
                                                           if rule.owner is not None and rule.owner.unless}
    role_grants = {name: {g for member in inherited[name] for g in roles[member].permissions} for name in roles}
    role_permissions = {name: frozenset(p for p in needed if any(grants(g, p) for g in role_grants[name]))
                        for name in roles}
    if not scopes_as_permissions:
        granted = set().union(*role_permissions.values())
        problems.extend(_ungranted(rules, granted))
    if problems:
        raise PolicyErrors(problems)
    compiled = [_rule(index, rule, inherited) for index, rule in enumerate(rules)]
    return Policy(compiled, role_permissions, scopes_as_permissions, default_allow)


def _inheritance(roles: Mapping[str, Any], problems: list[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """Each role with every role it inherits from, itself included; cycles and unknown names are problems."""
    for name, role in roles.items():
        for position, parent in enumerate(role.inherits):
            if parent not in roles:
                problems.append((f"roles.{name}.inherits[{position}]", _unknown_role(parent, roles)))
    if problems:
        return {}
    closure: dict[str, frozenset[str]] = {}
    reported: set[str] = set()
    for name in roles:
        cycle = _cycle_from(name, roles)
        if cycle is not None and not reported & set(cycle):
            reported.update(cycle)
            problems.append((f"roles.{cycle[0]}.inherits", "inheritance cycle: " + " -> ".join(cycle + [cycle[0]])))
    if problems:
        return {}
    for name in roles:
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(roles[current].inherits)
        closure[name] = frozenset(seen)
    return closure


def _cycle_from(start: str, roles: Mapping[str, Any]) -> list[str] | None:
    """A cycle through ``start`` (as the list of its roles), or None."""
    path: list[str] = []

    def visit(name: str, on_path: set[str]) -> list[str] | None:
        if name == start and path:
            return list(path)
        if name in on_path:
            return None
        on_path.add(name)
        path.append(name)
        for parent in roles[name].inherits:
            found = visit(parent, on_path)
            if found is not None:
                return found
        path.pop()
        return None

    return visit(start, set())


def _ungranted(rules: Sequence[Any], granted: set[str]) -> Iterator[tuple[str, str]]:
    for index, rule in enumerate(rules):
        for position, permission in enumerate(rule.require):
            if permission not in granted:
                yield (f"rules[{index}].require[{position}]",
                       f"no role grants {permission!r} (a typo? scopes_as_permissions is false)")
        if rule.owner is not None and rule.owner.unless and rule.owner.unless not in granted:
            yield (f"rules[{index}].owner.unless",
                   f"no role grants {rule.owner.unless!r} (a typo? scopes_as_permissions is false)")


def _rule(index: int, rule: Any, inherited: Mapping[str, frozenset[str]]) -> Rule:
    methods = None
    if rule.methods:
        methods = frozenset(rule.methods) | ({"HEAD"} if "GET" in rule.methods else set())
    accepted = None
    if rule.roles:
        accepted = frozenset(name for name, members in inherited.items() if members & set(rule.roles))
    owner = None
    if rule.owner is not None:
        source = rule.owner.equals
        owner = Owner(rule.owner.param, f"r{index}_{rule.owner.param}",
                      None if source == "consumer.id" else source.removeprefix("claims."), rule.owner.unless)
    return Rule(index, f"r{index}", rule.path, methods, tuple(rule.require), accepted, tuple(rule.roles),
                rule.public, owner, Verdict(ALLOWED, rule=index))


def _unknown_role(name: str, roles: Iterable[str]) -> str:
    known = ", ".join(sorted(roles)) or "none"
    return f"unknown role {name!r} (roles: {known})"
