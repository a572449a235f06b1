// Which capability's CPU kernels run (csrc/cpu/kernels.h): handgrad's import loads one
// library of csrc/cpu/kernels/ and publishes its table here.
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <atomic>

#include "kernels.h"

namespace handgrad::cpu {
namespace {

std::atomic<const Kernels*> loaded{nullptr};

}  // namespace

const Kernels& kernels() {
  const Kernels* table = loaded.load(std::memory_order_acquire);
  TORCH_CHECK(table != nullptr,
              "handgrad: no CPU kernels are loaded; import handgrad, which chooses them for this "
              "CPU, rather than handgrad._C alone");
  return *table;
}

std::string load_kernels(const std::string& path) {
  // RTLD_LOCAL: each capability's symbols stay its own. A library stays loaded for good, so
  // a table handed out earlier stays valid.
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(library != nullptr, "handgrad: cannot load the CPU kernels ", path, ": ", dlerror());
  using Entry = const Kernels* (*)();
  const auto entry = reinterpret_cast<Entry>(dlsym(library, "handgrad_cpu_kernels"));
  TORCH_CHECK(entry != nullptr, "handgrad: ", path, " has no handgrad_cpu_kernels: not a "
              "handgrad CPU kernel library");
  const Kernels* table = entry();
  TORCH_CHECK(table->version == kKernelsVersion, "handgrad: ", path, " was built from other "
              "sources (kernel table version ", table->version, ", expected ", kKernelsVersion,
              "); rebuild handgrad");
  loaded.store(table, std::memory_order_release);
  return table->capability;
}

}  // namespace handgrad::cpu
