# The client's dependencies, found the same way when building the library and when a
# project uses the installed package (camserve_clientConfig.cmake includes this file).
#
# gRPC and protobuf: Debian 12's libgrpc++-dev ships a CMake package (gRPCConfig.cmake,
# which pulls in CMake's FindProtobuf); where there is none, pkg-config's grpc++ and
# protobuf modules. Either way the result is one imported target, camserve::grpc.
include_guard(GLOBAL)

if(NOT TARGET camserve::grpc)
  find_package(gRPC CONFIG QUIET)
  if(gRPC_FOUND AND TARGET gRPC::grpc++ AND TARGET protobuf::libprotobuf)
    add_library(camserve::grpc INTERFACE IMPORTED)
    target_link_libraries(camserve::grpc INTERFACE gRPC::grpc++ protobuf::libprotobuf)
    set(CAMSERVE_GRPC_FOUND_BY "CMake config (gRPC ${gRPC_VERSION})")
  else()
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(CAMSERVE_GRPC REQUIRED IMPORTED_TARGET grpc++ protobuf)
    add_library(camserve::grpc INTERFACE IMPORTED)
    target_link_libraries(camserve::grpc INTERFACE PkgConfig::CAMSERVE_GRPC)
    set(CAMSERVE_GRPC_FOUND_BY "pkg-config (grpc++ ${CAMSERVE_GRPC_grpc++_VERSION})")
  endif()
endif()

find_package(Threads REQUIRED)
