from twisted.application.service import ServiceMaker

pushdDevice = ServiceMaker(
    "pushd device",
    "pushd.device.tap",
    "Device daemon: one courier connection shared by all local apps.",
    "pushd-device",
)
