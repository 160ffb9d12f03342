from twisted.application.service import ServiceMaker

pushdGateway = ServiceMaker(
    "pushd gateway",
    "pushd.gateway.tap",
    "Push gateway: courier listeners for devices, provider API for app servers.",
    "pushd-gateway",
)
