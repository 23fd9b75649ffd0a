"""Shared test data: one syntactically valid and one invalid program per supported language."""

from __future__ import annotations

F = "```"  # a fence, to keep the tables readable

VALID: dict[str, str] = {
    "python": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "cpp": "#include <vector>\nint main() {\n    std::vector<int> v{1, 2};\n    return v.size();\n}",
    "c": '#include <stdio.h>\nint main(void) {\n    printf("%d\\n", 3);\n    return 0;\n}',
    "java": "public class Main {\n    public static void main(String[] args) {\n"
    "        System.out.println(1);\n    }\n}",
    "javascript": "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2));",
    "go": 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println(1)\n}',
    "rust": 'fn main() {\n    let v: Vec<i32> = vec![1, 2];\n    println!("{}", v.len());\n}',
}
INVALID: dict[str, str] = {
    "python": "def add(a, b)\n    return a +",
    "cpp": "int main() {\n    return 0\n",
    "c": 'int main(void) {\n    printf("hi");\n    return 0;\n',
    "java": "public class Main {\n    void f( { }\n}",
    "javascript": "function add(a, b) {\n  return a + ;\n",
    "go": "package main\n\nfunc main() {\n\tfmt.Println(1\n}",
    "rust": "fn main() {\n    let x = ;\n}",
}
