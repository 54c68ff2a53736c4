"""The pure parts: Cache-Control parsing, freshness and age, what may be stored, conditional
requests and keys."""

from __future__ import annotations

from multidict import CIMultiDict

from plugway_cache import CacheSettings
from plugway_cache.directives import (
    HIT, REVALIDATE, STALE, STALE_REVALIDATE, StaleRules, evaluate, explicit_lifetime, format_http_date, http_date,
    initial_age, parse_cache_control, stale_rules, storability, unstored_fields,
)
from plugway_cache.keys import base_key, host_port, part_value, sorted_query, variant_key, vary_names
from plugway_cache.validators import entity_tags, not_modified

SETTINGS = CacheSettings()
LOOSE = StaleRules(0.0, 0.0, False)


def test_cache_control_parsing():
    cc = parse_cache_control(['public, max-age=60, private="Set-Cookie, X-User"', 'no-cache="A",S-MAXAGE=5'])
    assert cc.seconds("max-age") == 60 and cc.seconds("s-maxage") == 5
    assert cc.fields("private") == ("set-cookie", "x-user") and cc.fields("no-cache") == ("a",)
    assert "public" in cc and not cc.unqualified("private") and cc.unqualified("public")
    assert unstored_fields(cc) == {"set-cookie", "x-user", "a"}
    assert parse_cache_control(['max-age="30"']).seconds("max-age") == 30
    assert parse_cache_control(["max-age=abc"]).seconds("max-age") == 0  # invalid: stale
    assert parse_cache_control(["max-age=10, max-age=20"]).seconds("max-age") == 0  # conflicting: stale
    assert parse_cache_control(["max-age=99999999999"]).seconds("max-age") == 2147483648
    assert parse_cache_control([""]).directives == {}


def test_http_dates_in_the_three_formats():
    assert http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    assert http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert http_date("Sun Nov  6 08:49:37 1994") == 784111777
    assert http_date("0") is None and http_date(None) is None
    assert http_date(format_http_date(784111777)) == 784111777


def test_explicit_lifetime_order():
    cc = parse_cache_control
    assert explicit_lifetime(cc(["max-age=10, s-maxage=20"]), [], None, 0) == 20
    assert explicit_lifetime(cc(["max-age=10"]), ["Thu, 01 Jan 1970 00:01:40 GMT"], None, 0) == 10
    assert explicit_lifetime(cc([]), ["Thu, 01 Jan 1970 00:01:40 GMT"], 40.0, 1000.0) == 60
    assert explicit_lifetime(cc([]), ["0"], None, 0) == 0
    assert explicit_lifetime(cc([]), ["Thu, 01 Jan 1970 00:01:40 GMT", "Thu, 01 Jan 1970 00:01:41 GMT"], 0, 0) == 0
    assert explicit_lifetime(cc(["public"]), [], None, 0) is None


def test_initial_age_is_corrected_for_the_delay_and_the_upstreams_age():
    assert initial_age(None, 100.0, 100.0, 103.0) == 3  # apparent age from Date
    assert initial_age("10", 100.0, 99.0, 100.5) == 11.5  # Age plus the response delay
    assert initial_age("junk", None, 5.0, 5.0) == 0


def test_evaluate():
    assert evaluate(5, 10, no_cache=False, rules=LOOSE, request=None) == HIT
    assert evaluate(10, 10, no_cache=False, rules=LOOSE, request=None) == REVALIDATE
    assert evaluate(5, 10, no_cache=True, rules=LOOSE, request=None) == REVALIDATE
    swr = StaleRules(30.0, 0.0, False)
    assert evaluate(20, 10, no_cache=False, rules=swr, request=None) == STALE_REVALIDATE
    assert evaluate(41, 10, no_cache=False, rules=swr, request=None) == REVALIDATE
    assert evaluate(20, 10, no_cache=False, rules=StaleRules(30.0, 0.0, True), request=None) == REVALIDATE
    request = parse_cache_control
    assert evaluate(5, 10, no_cache=False, rules=LOOSE, request=request(["max-age=4"])) == REVALIDATE
    assert evaluate(5, 10, no_cache=False, rules=LOOSE, request=request(["min-fresh=6"])) == REVALIDATE
    assert evaluate(15, 10, no_cache=False, rules=LOOSE, request=request(["max-stale=10"])) == STALE
    assert evaluate(25, 10, no_cache=False, rules=LOOSE, request=request(["max-stale=10"])) == REVALIDATE
    assert evaluate(1000, 10, no_cache=False, rules=LOOSE, request=request(["max-stale"])) == STALE


def test_stale_rules():
    cc = parse_cache_control
    assert stale_rules(cc(["max-age=1, stale-while-revalidate=5, stale-if-error=7"]), 1, 2) == StaleRules(5, 7, False)
    assert stale_rules(cc(["max-age=1"]), 1, 2) == StaleRules(1, 2, False)
    assert stale_rules(cc(["s-maxage=1"]), 1, 2) == StaleRules(0, 0, False)  # implied proxy-revalidate
    assert stale_rules(cc(["s-maxage=1, stale-if-error=9"]), 1, 2) == StaleRules(0, 9, False)
    assert stale_rules(cc(["max-age=1, must-revalidate, stale-if-error=9"]), 1, 2) == StaleRules(0, 0, True)


def verdict(cc: str, status: int = 200, lifetime: float | None = 60.0, settings=SETTINGS, **facts):
    options = dict(has_validator=False, has_set_cookie=False, vary_star=False, authorized=False,
                   request_no_store=False)
    options.update(facts)
    return storability(status, parse_cache_control([cc]), lifetime, settings=settings, **options)


def test_storability():
    assert verdict("max-age=60").store
    assert not verdict("max-age=60", status=500).store and not verdict("max-age=60", status=500).intrinsic
    assert not verdict("max-age=60", status=400).store and verdict("max-age=60", status=400).intrinsic
    assert not verdict("no-store").store
    assert verdict("no-store, must-understand").store
    assert not verdict("private").store and verdict('private="X"').store
    assert not verdict("max-age=60", vary_star=True).store
    assert not verdict("max-age=60", has_set_cookie=True).store
    assert verdict("max-age=60", has_set_cookie=True, settings=CacheSettings(allow_set_cookie=True)).store
    refused = verdict("max-age=60", authorized=True)
    assert not refused.store and not refused.intrinsic  # it depends on the request, not the response
    assert all(verdict(cc, authorized=True).store for cc in ("public", "s-maxage=5", "max-age=5, must-revalidate"))
    assert verdict("max-age=60", authorized=True, settings=CacheSettings(authorization="shared")).store
    assert not verdict("", lifetime=None).store
    assert verdict("no-cache", lifetime=None, has_validator=True).store
    assert not verdict("no-cache", lifetime=None).store
    assert not verdict("max-age=60", request_no_store=True).store


def test_conditional_requests():
    assert entity_tags('W/"a", "b,c" ,*') == ['W/"a"', '"b,c"', "*"]
    headers = {"If-None-Match": 'W/"v1"'}
    assert not_modified(headers, '"v1"', None) and not not_modified(headers, '"v2"', None)
    assert not_modified({"If-None-Match": "*"}, '"x"', None)
    assert not not_modified({"If-None-Match": '"x"'}, None, "Sun, 06 Nov 1994 08:49:37 GMT")
    since = {"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}
    assert not_modified(since, None, "Sun, 06 Nov 1994 08:49:37 GMT")
    assert not not_modified(since, None, "Mon, 07 Nov 1994 08:49:37 GMT")
    assert not not_modified({**since, "If-None-Match": '"other"'}, '"v1"', "Sun, 06 Nov 1994 08:49:37 GMT")


def test_keys():
    key = base_key("GET", "https", "api.example.com", "", "/a/b", "x=1", [("consumer", "alice"), ("version", None)])
    assert key == "cache:/a/b?x=1 https://api.example.com GET consumer=alice version=-"
    assert base_key("GET", "http", "h", ":8080", "/", "") == "cache:/ http://h:8080 GET"
    assert sorted_query("b=2&a=1&c") == "a=1&b=2&c" and sorted_query("x=1") == "x=1"
    assert (host_port("h:80"), host_port("h"), host_port("[::1]:9"), host_port("[::1]")) == (":80", "", ":9", "")
    assert part_value("has space").startswith("h:") and part_value("x" * 65).startswith("h:")
    assert part_value("ok") == "ok" and part_value("") == ""
    assert vary_names(["Accept-Language, accept-encoding", "X-A"]) == ("accept-encoding", "accept-language", "x-a")
    assert vary_names(["Accept, *"]) is None and vary_names([]) == ()


def test_variant_keys_depend_on_every_varying_value_and_the_record():
    def variant(nonce: str, **values: str) -> str:
        return variant_key("cache:/a", nonce, ("accept-language", "x-b"), CIMultiDict(values))

    assert variant("n", **{"accept-language": "en"}) != variant("n", **{"accept-language": "fr"})
    assert variant("n") != variant("n", **{"accept-language": ""})  # absent is not empty
    assert variant("n", **{"x-b": "1"}) == variant("n", **{"X-B": "1"})
    assert variant("n") != variant("m")  # a new Vary record makes old variants unreachable
    headers = CIMultiDict([("X-B", "1"), ("X-B", "2")])
    assert variant_key("cache:/a", "n", ("x-b",), headers) != variant_key("cache:/a", "n", ("x-b",),
                                                                           CIMultiDict([("X-B", "1")]))


def test_route_settings_checks():
    from gateway.config import loads
    from gateway.config.schema import ConfigErrors
    from gateway.plugins import load_plugins

    def errors(plugin: str, route: str = "") -> list[str]:
        text = f"""
            [[upstreams]]
            name = "a"
            targets = [{{ url = "http://127.0.0.1:1" }}]
            [[routes]]
            name = "r"
            prefix = "/"
            upstream = "a"
            {route}
            [plugins.cache]
            {plugin}
        """
        try:
            load_plugins(loads("\n".join(line.strip() for line in text.splitlines())))
        except ConfigErrors as exc:
            return [str(error) for error in exc.errors]
        return []

    assert errors("") == []
    assert errors('methods = ["POST"]') and errors('statuses = [206]') and errors('key_extra = ["ip"]')
    assert errors("default_ttl_statuses = [500]") == ["plugins.cache.default_ttl_statuses: must be among statuses"]
    assert errors('store = "shared"\nmax_object_size = "9MiB"')
    assert errors('memory_size = "1MiB"', '[routes.plugins.cache]\nmemory_size = "2MiB"') == [
        "routes[0].plugins.cache.memory_size: is the size of each worker's memory store: set it in [plugins.cache] only"]
    assert errors('memory_size = "2MiB"', '[routes.plugins.cache]\nsort_query = true') == []
    settings = CacheSettings(key_extra=("consumer", "header:X-Tenant"))
    assert settings.key_parts == (("consumer", "consumer", ""), ("header:x-tenant", "header", "X-Tenant"))
    assert settings.keyed_by_consumer and not settings.keyed_by_authorization
    assert CacheSettings(key_extra=("header:authorization",)).keyed_by_authorization
    assert not CacheSettings().keyed_by_consumer and not CacheSettings().keyed_by_authorization
