// tsvmm native addon: the sandbox (Landlock for the process, seccomp for
// vCPU threads). See sandbox.cc.
#pragma once

#include <napi.h>

#include <cstdint>
#include <vector>

namespace tsvmm {

// Installs a seccomp filter (a struct sock_filter array, as bytes) on the
// calling thread, after setting no_new_privs. Returns 0 or an errno.
int InstallSeccompFilter(const std::vector<uint8_t>& program);

// The SIGSYS handler that reports a call a filter trapped and ends the process.
void InstallSigsysHandler();

// Adds landlockAbi, landlockRestrictProcess and seccompSelfTest to exports,
// and the numbers a filter is written with to `constants`.
void RegisterSandbox(Napi::Env env, Napi::Object exports, Napi::Object constants);

}  // namespace tsvmm
