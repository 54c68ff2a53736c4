"""atheris target: the request-head validator and the path canonicaliser, on arbitrary bytes.

A finding is any exception other than the refusals they are allowed to raise (GatewayError,
BadPath), or a canonical path that fails the canonicaliser's own invariants. Run through
scripts/fuzz; a crash it finds becomes a case in tests/corpus/requests.toml.
"""

import sys

import atheris

with atheris.instrument_imports():
    from gateway.errors import GatewayError
    from gateway.paths import BadPath, canonical_path
    from gateway.requesthead import HeadRules, check_head

RULES = HeadRules(frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}), 32 * 1024)


def check_path(path: str) -> None:
    try:
        canonical = canonical_path(path)
    except BadPath:
        return
    assert canonical_path(canonical) == canonical, (path, canonical)
    segments = canonical.split("/")[1:]
    assert "." not in segments and ".." not in segments and "//" not in canonical, (path, canonical)
    assert "%2f" not in canonical.lower() and "\\" not in canonical, (path, canonical)


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    method = provider.PickValueInList(["GET", "POST", "HEAD", "TRACE", "get", "OPTIONS"])
    version = (provider.ConsumeIntInRange(0, 3), provider.ConsumeIntInRange(0, 9))
    headers = tuple(
        (provider.ConsumeBytes(provider.ConsumeIntInRange(0, 20)), provider.ConsumeBytes(provider.ConsumeIntInRange(0, 40)))
        for _ in range(provider.ConsumeIntInRange(0, 6))
    )
    host = provider.ConsumeUnicodeNoSurrogates(12) if provider.ConsumeBool() else None
    target = provider.ConsumeUnicodeNoSurrogates(200)
    try:
        origin = check_head(RULES, method, version, headers, target, host)
    except GatewayError:
        return
    check_path(origin.partition("?")[0])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
