from twisted.application.service import ServiceMaker

ooidx = ServiceMaker("ooidx", "ooidx.node.tap", "The OOI Data Exchange daemon (one node)", "ooidx")
