"""twistd plugin: ``twistd tunneld-client``."""
from twisted.application.service import ServiceMaker

tunneld_client = ServiceMaker(
    "tunneld client", "tunneld.client_tap", "tunneld client: dials the server, serves local backends", "tunneld-client"
)
