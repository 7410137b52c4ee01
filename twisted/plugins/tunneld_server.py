"""twistd plugin: ``twistd tunneld-server``."""
from twisted.application.service import ServiceMaker

tunneld_server = ServiceMaker(
    "tunneld server", "tunneld.server_tap", "tunneld public server: tunnel port and entries", "tunneld-server"
)
