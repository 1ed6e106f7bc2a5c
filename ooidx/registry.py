"""Which class runs each DX component.

Every name of the component table maps to L{ooidx.component.Component} (it
meets the bus under its name and answers C{ping}) until a module of its own
(``ooidx/<name>.py``) supplies a subclass; the web page is
L{ooidx.web.Web}, imported only when asked for.
"""
from __future__ import annotations

import importlib
from typing import Dict, Type

from ooidx.component import Component

#: component name -> "module:Class" of its implementation, imported on demand.
IMPLEMENTATIONS: Dict[str, str] = {
    "web": "ooidx.web:Web",
    "attribute_store": "ooidx.attribute_store:AttributeStore",
    "controller": "ooidx.controller:Controller",
    "fetcher": "ooidx.fetcher:Fetcher",
    "cache": "ooidx.cache:Cache",
    "proxyng": "ooidx.proxyng:Proxy",
    "csv": "ooidx.csv:CSV",
    "persister": "ooidx.persister:Persister",
    "pub_sub": "ooidx.pub_sub:PubSub",
    "distributor": "ooidx.distributor:Distributor",
    "notification": "ooidx.notification:Notification",
    "user_pub_sub": "ooidx.user_pub_sub:UserPubSub",
    "user_notification": "ooidx.user_notification:UserNotification",
}


def component_class(name: str) -> Type[Component]:
    """The class that runs component C{name}."""
    where = IMPLEMENTATIONS.get(name)
    if where is None:
        return Component
    module_name, _, class_name = where.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but something it needs does not
            raise
        return Component
    return getattr(module, class_name)
