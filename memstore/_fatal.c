/* A SIGBUS handler that names the memory-mapped file a fault hit, then lets the process die.
 *
 * A file truncated by another process, or a full disk under a sparse mapping, makes the kernel
 * send SIGBUS on the next access to the missing page: nothing can be recovered, but the log
 * must say what happened. memstore.fatal registers every mapping it makes here (address, length,
 * path); the handler finds the one holding si_addr and writes one line to stderr naming the
 * signal, the file and the offset. Then it puts back the handler that was there before (the
 * default action, or faulthandler's) and returns: the access faults again and the process dies
 * of SIGBUS as it would have.
 *
 * Only async-signal-safe calls in the handler (write, sigaction). The registry is a fixed array:
 * register fills an entry's path and length before publishing its start address, unregister
 * clears the start; both run under the GIL, the handler only reads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#define MAX_MAPPINGS 4096
#define MAX_PATH 512

typedef struct {
    volatile uintptr_t start; /* 0: free */
    volatile size_t length;
    char path[MAX_PATH];
} mapping_t;

static mapping_t mappings[MAX_MAPPINGS];
static struct sigaction previous;
static int installed = 0;

static void put(const char *text) {
    size_t n = strlen(text);
    while (n > 0) {
        ssize_t w = write(2, text, n);
        if (w <= 0) return;
        text += w;
        n -= (size_t)w;
    }
}

static void put_number(uintptr_t value, int base) {
    char buf[32];
    int i = sizeof(buf) - 1;
    buf[i] = '\0';
    do {
        buf[--i] = "0123456789abcdef"[value % base];
        value /= base;
    } while (value && i > 2);
    if (base == 16) {
        buf[--i] = 'x';
        buf[--i] = '0';
    }
    put(buf + i);
}

static void on_sigbus(int signum, siginfo_t *info, void *context) {
    (void)context;
    uintptr_t address = (uintptr_t)info->si_addr;
    const mapping_t *hit = NULL;
    for (int i = 0; i < MAX_MAPPINGS; i++) {
        uintptr_t start = mappings[i].start;
        if (start && address >= start && address - start < mappings[i].length) {
            hit = &mappings[i];
            break;
        }
    }
    put("memstore: fatal signal SIGBUS (bus error) at address ");
    put_number(address, 16);
    if (hit) {
        put(" in the memory-mapped file ");
        put(hit->path);
        put(" at offset ");
        put_number(address - hit->start, 10);
        put(": the file is shorter than when it was mapped (truncated or replaced in place by another process), "
            "or its disk is full; the process stops now. Restore the file (or free disk space) and restart\n");
    } else {
        put(" (not inside a file memstore mapped); the process stops now\n");
    }
    /* Back to what was there before, then return: the access faults again and that action runs. */
    sigaction(signum, &previous, NULL);
    if (info->si_code <= 0) /* sent by kill() or raise(): no access to repeat */
        raise(signum);
}

static PyObject *install(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    if (installed) Py_RETURN_FALSE;
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    installed = 1;
    Py_RETURN_TRUE;
}

static PyObject *register_mapping(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long start, length;
    const char *path;
    Py_ssize_t path_len;
    if (!PyArg_ParseTuple(args, "KKs#", &start, &length, &path, &path_len)) return NULL;
    /* A mapping never unregistered (its store not closed) may have left an entry at these addresses. */
    for (int i = 0; i < MAX_MAPPINGS; i++) {
        uintptr_t other = mappings[i].start;
        if (other && other < start + length && start < other + mappings[i].length)
            __atomic_store_n(&mappings[i].start, (uintptr_t)0, __ATOMIC_RELEASE);
    }
    for (int i = 0; i < MAX_MAPPINGS; i++) {
        if (mappings[i].start == 0) {
            size_t n = (size_t)path_len < MAX_PATH - 1 ? (size_t)path_len : MAX_PATH - 1;
            memcpy(mappings[i].path, path, n);
            mappings[i].path[n] = '\0';
            mappings[i].length = (size_t)length;
            __atomic_store_n(&mappings[i].start, (uintptr_t)start, __ATOMIC_RELEASE);
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE; /* full: the fault is still reported, without the file's name */
}

static PyObject *unregister_mapping(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long start;
    if (!PyArg_ParseTuple(args, "K", &start)) return NULL;
    for (int i = 0; i < MAX_MAPPINGS; i++) {
        if (mappings[i].start == (uintptr_t)start) {
            __atomic_store_n(&mappings[i].start, (uintptr_t)0, __ATOMIC_RELEASE);
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, "Install the SIGBUS reporter (once); True if installed now."},
    {"register_mapping", register_mapping, METH_VARARGS, "register_mapping(start, length, path)"},
    {"unregister_mapping", unregister_mapping, METH_VARARGS, "unregister_mapping(start)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fatal", "SIGBUS reporter for mapped files.", -1, methods};

PyMODINIT_FUNC PyInit__fatal(void) { return PyModule_Create(&module); }
