"""A plugin found by import path rather than entry point: `[plugins."plugway_sample.pathplugin"]`."""

from gateway import PluginDeclaration, hookimpl


@hookimpl
def declare_plugin():
    return PluginDeclaration(priority=10)


@hookimpl
def on_response(response):
    response.headers["X-Path-Plugin"] = "1"
